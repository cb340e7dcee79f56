"""agent/profiling/python.py without a kernel: the 3.11 offsets checked against the running
interpreter (Debian's python3.11, the agent's own) through ctypes, the interpreter found in
this process's memory map, and the str decoding and frame interleaving the drain does."""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from agent.profiling.python import (
    DEBUG_OFFSETS_SIZE,
    NO_CFRAME,
    OFFSETS,
    UNSUPPORTED,
    Interpreter,
    Offsets,
    PythonFinder,
    decode_str,
    interleave,
    load_bias,
    offsets_for,
    parse_debug_offsets,
    python_frame,
)


def u64(addr: int) -> int:
    return int.from_bytes(ctypes.string_at(addr, 8), "little")


def test_the_3_11_offsets_walk_this_interpreter_from_PyRuntime_to_the_calling_functions() -> None:
    assert sys.version_info[:2] == (3, 11)  # the project's interpreter: the offsets checked are 3.11's
    o = OFFSETS[(3, 11)]
    found = PythonFinder().find(os.getpid())
    assert found is not None and found.version == (3, 11)
    assert found.runtime == ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    sa = ctypes.string_at  # a Python function: its frame is the innermost while it reads

    def walk() -> list[tuple[str, str, int]]:
        interp = u64(found.runtime + o.interp_head)
        ts = u64(interp + o.threads_head)
        while ts and int.from_bytes(sa(ts + o.tstate_native_tid, 8), "little") != threading.get_native_id():
            ts = u64(ts + o.tstate_next)
        assert ts
        frame = u64(u64(ts + o.tstate_cframe) + o.cframe_frame)
        out = []
        for _ in range(4):
            code = u64(frame + o.frame_code)
            name, file = (u64(code + off) for off in (o.code_name, o.code_file))
            line = int.from_bytes(sa(code + o.code_line, 4), "little")
            texts = []
            for s in (name, file):
                state = sa(s + o.str_state, 1)[0]
                texts.append(decode_str(sa(s + (o.str_ascii if state >> 6 & 1 else o.str_compact), 200), state))
            out.append((texts[0] or "", texts[1] or "", line))
            frame = u64(frame + o.frame_previous)
        return out

    def outer() -> list[tuple[str, str, int]]:
        return walk()

    frames = outer()
    here = __file__
    # u64's, sa's and walk's frames may be innermost, depending on which call reads: skip to walk
    names = [f[0] for f in frames]
    i = names.index("test_the_3_11_offsets_walk_this_interpreter_from_PyRuntime_to_the_calling_functions.<locals>.walk")
    assert frames[i + 1] == ("test_the_3_11_offsets_walk_this_interpreter_from_PyRuntime_to_the_calling_functions"
                             ".<locals>.outer", here, outer.__code__.co_firstlineno)
    assert frames[i][1:] == (here, walk.__code__.co_firstlineno)


def test_str_decoding_checks_the_state_bits() -> None:
    ascii_state = 0b11100100  # ready, ascii, compact, kind 1
    assert decode_str(b"handler\0junk", ascii_state) == "handler"
    assert decode_str(b"caf\xe9\0", 0b10100100) == "caf\xe9"  # compact Latin-1
    assert decode_str(b"x\0", 0b10101000) is None  # kind 2: two bytes per character
    assert decode_str(b"x\0", 0b11000100) is None  # not compact: the text is elsewhere


def test_python_frames_stand_in_place_of_the_eval_loop() -> None:
    py = [python_frame("leaf", "/app/a.py", 3), python_frame("main", "/app/a.py", 10)]
    native = ["json_encode :0", "_PyEval_EvalFrameDefault :0", "_PyEval_Vector :0", "main :0"]
    assert interleave(native, py) == ["json_encode :0", *py]
    # no eval-loop frame among the native ones (no frame pointers): the native leaf only
    assert interleave(["/usr/bin/python3.11+1cfb24 :0", "[unknown] :0"], py) == ["/usr/bin/python3.11+1cfb24 :0", *py]
    assert interleave(["a :0"], []) == ["a :0"]
    assert python_frame("", "f.py", 1) == "[unknown] f.py:1"


def test_load_bias_from_a_mapping_of_a_pie_and_a_fixed_address_file() -> None:
    segments = ((0, 0x1000, 0), (0x1000, 0x5000, 0x1000), (0x6010, 0x200, 0x7010))
    assert load_bias(segments, 0x7F0000001000, 0x1000) == 0x7F0000000000
    assert load_bias(segments, 0x7F0000007000, 0x6000) == 0x7F0000000000  # data: p_offset not page-aligned
    fixed = ((0, 0x1000, 0x400000), (0x1000, 0x5000, 0x401000))
    assert load_bias(fixed, 0x401000, 0x1000) == 0


def test_no_interpreter_without_a_readable_memory_map() -> None:
    assert PythonFinder(procfs="/nonexistent").find(1) is None


# The first 71 u64 words of Debian 13's python3.13 (3.13.5) _PyRuntime, its _Py_DebugOffsets
# (cookie, version, free_threaded, then sections each led by the structure's size).
DEBUG_3_13 = [0, 0x30D05F0, 0, 283376, 608, 632, 194976, 7272, 7264, 7344, 7400, 7656, 7640, 7648, 16, 7752, 0,
              7768, 7760, 304, 0, 8, 16, 72, 152, 160, 232, 32, 80, 8, 0, 56, 72, 70, 208, 112, 120, 128, 136, 68,
              52, 96, 104, 200, 16, 8, 416, 24, 88, 168, 32, 24, 16, 40, 24, 16, 48, 32, 40, 24, 16, 32, 16, 24, 40,
              16, 32, 64, 32, 16, 40]


def debug_bytes(words: list[int]) -> bytes:
    raw = b"xdebugpy" + b"".join(w.to_bytes(8, "little") for w in words[1:])
    return raw + bytes(DEBUG_OFFSETS_SIZE - len(raw))


def test_3_13_offsets_come_from_the_interpreters_debug_offsets() -> None:
    o = parse_debug_offsets(debug_bytes(DEBUG_3_13))
    assert o == Offsets(interp_head=632, threads_head=7344, tstate_next=8, tstate_native_tid=160,
                        tstate_cframe=NO_CFRAME, cframe_frame=72, frame_code=0, frame_previous=8, code_name=128,
                        code_file=112, code_line=68, str_state=32, str_ascii=40, str_compact=56, frame_owner=70)
    assert parse_debug_offsets(b"xdebugpz" + debug_bytes(DEBUG_3_13)[8:]) is None  # no cookie
    assert parse_debug_offsets(debug_bytes(DEBUG_3_13)[:100]) is None  # short
    far = list(DEBUG_3_13)
    far[25] = 0x10000  # native_thread_id beyond the kernel's u16
    assert parse_debug_offsets(debug_bytes(far)) is None


def test_versions_without_tested_offsets_are_refused_with_a_reason() -> None:
    segs = ((0, 0x1000, 0),)
    for v in ((3, 8), (3, 9), (3, 10), (3, 12)):
        assert offsets_for(Interpreter(0x100, v, segs)) is None and UNSUPPORTED[v]
    assert offsets_for(Interpreter(0x100, (3, 11), segs)) == OFFSETS[(3, 11)]
    assert offsets_for(Interpreter(0x100, (3, 13), segs)) is None  # no debug offsets read
