"""Compile the programs in bpf/ once, attach them, and poll their event buffers.

One BCC compile covers every enabled probe family: the loader joins each family's file into one
translation unit with the feature defines, so LLVM runs once at start-up.
Tracepoints attach through BCC's TRACEPOINT_PROBE auto-attach; kprobes are never used (kernels
without CONFIG_KPROBES exist). Ring buffer on 5.8+, perf buffer otherwise; events the kernel
side could not hand over are counted per buffer. Knows nothing of what the events mean.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.ebpf.headers import HeadersSource

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
RINGBUF_MIN_KERNEL = (5, 8)


@dataclass(frozen=True)
class Family:
    """A probe family: one file in bpf/, the buffers it emits events on, what it is for."""

    name: str
    source: str
    buffers: tuple[str, ...]
    purpose: str
    perf_functions: tuple[str, ...] = ()  # attached to a cpu-clock perf event on every CPU
    uprobe_functions: tuple[str, ...] = ()  # loaded at start, attached later by their owner
    defines: tuple[str, ...] = ()  # set when the family is compiled in (other files test them)
    requires: tuple[str, ...] = ()  # families compiled in with it (their maps and hooks are used)
    pages: int = 0  # perf buffer pages per CPU when more than the default (ring size is in the C file)


FAMILIES: dict[str, Family] = {
    "proc": Family("proc", "proc.c", ("proc_events",), "process lifecycle and OOM kills (tracepoints)"),
    "tcp": Family("tcp", "tcp.c", ("tcp_events",), "TCP connects, listens, closes, retransmits, bytes (tracepoints)"),
    "l7": Family("l7", "l7.c", ("l7_events",), "HTTP, Postgres, Redis and DNS requests paired with responses; "
                 "OpenSSL plaintext (tracepoints, uprobes)",
                 uprobe_functions=tuple(f"ssl_{op}{ex}_{end}" for op in ("write", "read") for ex in ("", "_ex")
                                        for end in ("enter", "exit")),
                 defines=("CA_L7",), requires=("tcp",), pages=256),
    "logs": Family("logs", "logs.c", ("log_events",), "log files opened for writing under /var/log (tracepoint)"),
    "profiler": Family("profiler", "profiler.c", (), "CPU stacks sampled by a cpu-clock perf event",
                       perf_functions=("on_cpu_sample",)),
}

Handler = Callable[[bytes], None]


class LoadError(Exception):
    """BPF compile or attach failed; the message says which family and why."""


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or os.uname().release
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def ringbuf_supported(release: str | None = None) -> bool:
    return kernel_version(release) >= RINGBUF_MIN_KERNEL


def feature_defines(events_dir: str | None = None) -> dict[str, int]:
    """Defines that depend on what this kernel's tracepoints carry (from their format files)."""
    from agent.ebpf.tracefs import tracefs_events_dir

    events_dir = events_dir or tracefs_events_dir() or ""
    out: dict[str, int] = {}
    try:
        with open(os.path.join(events_dir, "tcp", "tcp_retransmit_skb", "format")) as f:
            if re.search(r"field:int err;", f.read()):
                out["CA_TCP_RETRANSMIT_HAS_ERR"] = 1
    except OSError:
        pass
    if os.path.isdir(os.path.join(events_dir, "syscalls", "sys_enter_openat2")):
        out["CA_LOGS_OPENAT2"] = 1  # bpf/logs.c traces openat2 opens too (kernel 5.6+)
    return out


def with_requirements(families: Iterable[str]) -> tuple[str, ...]:
    """The families and those they require, in FAMILIES order."""
    want = set(families)
    for name in list(want):
        want.update(FAMILIES[name].requires)
    return tuple(n for n in FAMILIES if n in want)


def program_text(families: Iterable[str], bpf_dir: Path = BPF_DIR) -> str:
    lines = []
    for name in with_requirements(families):  # FAMILIES order: l7 follows tcp
        fam = FAMILIES[name]
        path = bpf_dir / fam.source
        text = path.read_text()
        if re.search(r"\bk(ret)?probe__|attach_kprobe", text):
            raise LoadError(f"{path}: uses a kprobe; only tracepoints, uprobes and perf events are allowed")
        # Inlined, not #included: BCC generates the tracepoint argument structs only for
        # TRACEPOINT_PROBEs it finds in the main text. #line keeps errors naming the file.
        lines.append(f'#line 1 "{path}"\n{text}')
    return "\n".join(lines) + "\n"


@dataclass
class Loaded:
    """The attached programs and their buffers. Poll from one thread only."""

    bpf: object
    families: tuple[str, ...]
    ringbuf: bool
    compile_seconds: float
    perf_events: int = 0
    _perf_lost: dict[str, int] = field(default_factory=dict)
    _callbacks: list[object] = field(default_factory=list)  # keep ctypes callbacks alive

    @property
    def tracepoints(self) -> list[str]:
        """Attached tracepoints; raw ones as 'raw:<name>'."""
        names = [k.decode() if isinstance(k, bytes) else k for k in self.bpf.tracepoint_fds]
        names += ["raw:" + (k.decode() if isinstance(k, bytes) else k) for k in self.bpf.raw_tracepoint_fds]
        return sorted(names)

    def missed_runs(self) -> dict[str, int]:
        """Runs the kernel skipped per program (recursion_misses: a program that fired while
        another BPF program ran on that CPU). Each is an event that was not seen."""
        out = {}
        for fname, fn in self.bpf.funcs.items():
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            name = fname.decode() if isinstance(fname, bytes) else fname
                            out[name] = int(line.split()[1])
            except (OSError, ValueError):
                continue
        return out

    def poll(self, timeout_ms: int) -> None:
        """Handle events as they come, waiting at most `timeout_ms`, then drain every ring: a
        buffer written without wake-ups (bpf/l7.c wakes user space once per batch) is read on
        any wake-up and at least every `timeout_ms`. Per-event wake-ups of the other buffers
        keep them close to the order things happened (a process's exit after the close and
        failed-connect events it caused, which travel in another buffer)."""
        if self.ringbuf:
            if self.bpf._ringbuf_manager:
                self.bpf.ring_buffer_poll(timeout_ms)
                self.bpf.ring_buffer_consume()
            else:
                time.sleep(timeout_ms / 1000)
        elif self.bpf.perf_buffers:
            self.bpf.perf_buffer_poll(timeout_ms)
        else:
            time.sleep(timeout_ms / 1000)

    def lost(self) -> dict[str, int]:
        """Events lost per buffer: kernel-side submit failures plus perf-reported losses."""
        out = {}
        for name in self.families:
            for buf in FAMILIES[name].buffers:
                tbl = self.bpf[f"{buf}_lost"]
                kernel_side = sum(int(v) for v in tbl[tbl.Key(0)])
                out[buf] = kernel_side + self._perf_lost.get(buf, 0)
        return out

    def table(self, name: str) -> object:
        return self.bpf[name]

    def run_seconds(self) -> dict[str, tuple[int, int]]:
        """(run time ns, run count) per attached program, from kernel.bpf_stats_enabled."""
        out = {}
        for fname, fn in self.bpf.funcs.items():
            info = _prog_info(fn.fd)
            if info:
                out[fname.decode() if isinstance(fname, bytes) else fname] = info
        return out

    def close(self) -> None:
        try:
            self.bpf.cleanup()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.exception("detaching probes")


def _prog_info(fd: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields.get("run_time_ns", "0")), int(fields.get("run_cnt", "0"))
    except (OSError, ValueError):
        return None


def load(
    families: Iterable[str],
    handlers: dict[str, Handler],
    headers: HeadersSource,
    defines: dict[str, str | int] | None = None,
    ringbuf: bool | None = None,
    bpf_dir: Path = BPF_DIR,
    pages: int = 64,
    sample_hz: int = 99,
) -> Loaded:
    """Compile and attach `families`; route each buffer's raw events to handlers[buffer]."""
    from bcc import BPF  # imported here: `check` and the unit tests must work without it

    families = with_requirements(families)
    if ringbuf is None:
        ringbuf = ringbuf_supported()
    for k, v in headers.env:
        os.environ[k] = v
    cflags = [f"-I{bpf_dir / 'include'}", f"-DCA_EVENTS_PAGES={pages}", "-Wno-macro-redefined"]
    if ringbuf:
        cflags.append("-DCA_RINGBUF")
    for k, v in (feature_defines() | (defines or {})).items():
        cflags.append(f"-D{k}={v}")
    for name in families:
        cflags += [f"-D{d}=1" for d in FAMILIES[name].defines]
    text = program_text(families, bpf_dir)
    t0 = time.monotonic()
    try:
        bpf = BPF(text=text, cflags=cflags)
    except Exception as e:  # BCC raises bare Exception on compile/attach errors
        raise LoadError(f"probe families {', '.join(families)}: {e}") from e
    took = time.monotonic() - t0
    loaded = Loaded(bpf=bpf, families=families, ringbuf=ringbuf, compile_seconds=took)
    for name in families:
        for fn in FAMILIES[name].perf_functions:
            from bcc import PerfSWConfig, PerfType

            try:
                bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                                      fn_name=fn, sample_freq=sample_hz, cpu=-1)
            except Exception as e:  # noqa: BLE001
                raise LoadError(f"probe family {name}: cannot attach {fn} to a cpu-clock perf event: {e}") from e
            loaded.perf_events += 1
    for name in families:
        for fn in FAMILIES[name].uprobe_functions:
            try:  # now: compiled code is freed below, and uprobes attach later
                bpf.load_func(fn, BPF.KPROBE)
            except Exception as e:  # noqa: BLE001
                raise LoadError(f"probe family {name}: cannot load {fn}: {e}") from e
    for name in families:
        for buf in FAMILIES[name].buffers:
            handler = handlers.get(buf)
            if handler is None:
                continue
            _open(loaded, buf, handler, max(pages, FAMILIES[name].pages))
    # LLVM's memory is only needed to compile: give it back (tens of MB of RSS), then have
    # glibc return the freed heap to the kernel (another ~40 MB measured here).
    bpf.free_bcc_memory()
    _malloc_trim()
    log.info(
        "BPF compiled and attached in %.2fs: %s; %s; %d tracepoints",
        took, ", ".join(families), "ring buffer" if ringbuf else "perf buffer",
        len(loaded.tracepoints),
    )
    return loaded


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _open(loaded: Loaded, buf: str, handler: Handler, pages: int) -> None:
    table = loaded.bpf[buf]
    if loaded.ringbuf:
        def on_ring(_ctx: object, data: int, size: int) -> int:
            handler(ctypes.string_at(data, size))
            return 0

        table.open_ring_buffer(on_ring)
        loaded._callbacks.append(on_ring)
    else:
        def on_perf(_cpu: int, data: int, size: int) -> None:
            handler(ctypes.string_at(data, size))

        def on_lost(count: int) -> None:
            loaded._perf_lost[buf] = loaded._perf_lost.get(buf, 0) + count

        table.open_perf_buffer(on_perf, page_cnt=pages, lost_cb=on_lost)
        loaded._callbacks.extend((on_perf, on_lost))
