"""Run by another CPython (3.9, 3.13, ...): walks its own frames through ctypes with the offsets
the agent would give the kernel (a JSON object on argv[1], plus `runtime`, _PyRuntime's address
as the agent found it from outside), from _PyRuntime to this file's functions, and prints what
it found as JSON: the runtime address as ctypes sees it and the frames (name, file, line)."""

import ctypes
import json
import sys
import threading

o = json.loads(sys.argv[1])
sa = ctypes.string_at


def u64(addr):
    return int.from_bytes(sa(addr, 8), "little")


def text(s):
    state = sa(s + o["str_state"], 1)[0]
    raw = sa(s + (o["str_ascii"] if state >> 6 & 1 else o["str_compact"]), 100)
    return raw.split(b"\0", 1)[0].decode("latin-1"), state


def walk():
    want = threading.get_native_id()
    ts = u64(u64(o["runtime"] + o["interp_head"]) + o["threads_head"])
    while ts and u64(ts + o["tstate_native_tid"]) != want:
        ts = u64(ts + o["tstate_next"])
    holder = ts if o["tstate_cframe"] == 0xFFFF else u64(ts + o["tstate_cframe"])
    frame = u64(holder + o["cframe_frame"])
    out = []
    while frame and len(out) < 12:
        owner = sa(frame + o["frame_owner"], 1)[0] if o["frame_owner"] else 0
        if owner != 3:
            code = u64(frame + o["frame_code"])
            name, file = text(u64(code + o["code_name"])), text(u64(code + o["code_file"]))
            line = int.from_bytes(sa(code + o["code_line"], 4), "little")
            out.append([name[0], file[0], line, name[1], file[1]])
        frame = u64(frame + o["frame_previous"])
    return out


def outer():
    return walk()


print(json.dumps({"runtime": ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime")),
                  "frames": outer()}))
