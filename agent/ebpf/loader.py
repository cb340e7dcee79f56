"""Compile the programs in bpf/ once, attach them, and poll their event buffers.

One BCC compile covers every enabled probe family: the loader joins each family's file into one
translation unit with the feature defines, so LLVM runs once at start-up.
Tracepoints attach through BCC's TRACEPOINT_PROBE auto-attach; kprobes are never used (kernels
without CONFIG_KPROBES exist). Ring buffer on 5.8+, perf buffer otherwise; events the kernel
side could not hand over are counted per buffer. Knows nothing of what the events mean.
`Loaded` is the one holder of the BCC object: components get its maps as agent/ebpf/maps.py
`BpfMap`s and attach uprobes through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import module_command
from agent.component import Component
from agent.ebpf.headers import HeadersSource
from agent.ebpf.maps import AttachError, BpfMap, ProgramsClosing
from agent.ebpf.ringbuf import Batched as Batched
from agent.ebpf.ringbuf import Ring, RingSet
from agent.ebpf.ringbuf import supported as bulk_rings_supported
from agent.metrics import Families

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
RINGBUF_MIN_KERNEL = (5, 8)
DETACH_THREADS = 64  # probes detached side by side at stop (one thread each, up to this)


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
    # (prog array, function, "tracepoint" | "kprobe" | "perf_event"): programs entered only by tail
    # calls, put in slot 0 of their array right after the compile
    tail_calls: tuple[tuple[str, str, str], ...] = ()
    more_sources: tuple[str, ...] = ()  # files in bpf/ compiled right after `source`, as part of it


FAMILIES: dict[str, Family] = {
    "proc": Family("proc", "proc.c", ("proc_events",), "process lifecycle and OOM kills (tracepoints)"),
    "tcp": Family("tcp", "tcp.c", ("tcp_events",), "TCP connects, listens, closes, retransmits, bytes (tracepoints)"),
    "l7": Family("l7", "l7.c", ("l7_events",), "HTTP, Postgres, Redis and DNS requests paired with responses; "
                 "OpenSSL plaintext (tracepoints, uprobes)",
                 uprobe_functions=tuple(f"ssl_{op}{ex}_{end}" for op in ("write", "read") for ex in ("", "_ex")
                                        for end in ("enter", "exit"))
                 + ("go_tls_write_enter", "go_tls_read_enter", "go_tls_read_return")  # Go crypto/tls
                 + ("rustls_write_enter", "rustls_write_exit", "rustls_read_enter", "rustls_read_exit"),  # rustls
                 defines=("CA_L7",), requires=("tcp",), pages=256,
                 tail_calls=(("l7_run_tp", "l7_run_tracepoint", "tracepoint"),
                             ("l7_run_uprobe", "l7_run_kprobe", "kprobe")),
                 more_sources=("rustls.c",)),
    "logs": Family("logs", "logs.c", ("log_events",), "log files opened for writing under /var/log (tracepoint)"),
    "profiler": Family("profiler", "profiler.c", (), "CPU stacks sampled by a cpu-clock perf event",
                       perf_functions=("on_cpu_sample",), tail_calls=(("native_progs", "on_cpu_unwind", "perf_event"),)),
    "python": Family("python", "python.c", (), "CPython GIL waits: pthread_cond_timedwait in the C library (uprobes)",
                     uprobe_functions=("python_cond_wait_enter", "python_cond_wait_exit")),
    "nodejs": Family("nodejs", "nodejs.c", (), "Node.js event-loop blocked time: libuv's uv__io_poll and I/O callbacks "
                     "(uprobes)", uprobe_functions=("nodejs_poll_enter", "nodejs_poll_exit", "nodejs_io_cb_enter",
                                                    "nodejs_io_cb_exit")),
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
        for source in (fam.source, *fam.more_sources):
            path = bpf_dir / source
            text = path.read_text()
            if re.search(r"\bk(ret)?probe__|attach_kprobe", text):
                raise LoadError(f"{path}: uses a kprobe; only tracepoints, uprobes and perf events are allowed")
            # Inlined, not #included: BCC generates the tracepoint argument structs only for
            # TRACEPOINT_PROBEs it finds in the main text (and rewrites map calls only there).
            # #line keeps errors naming the file.
            lines.append(f'#line 1 "{path}"\n{text}')
    return "\n".join(lines) + "\n"


@dataclass
class Loaded:
    """The attached programs and their buffers (the `Programs` that components see: maps by
    name through agent/ebpf/maps.py, uprobes). Poll from one thread only."""

    bpf: Any
    families: tuple[str, ...]
    ringbuf: bool
    compile_seconds: float
    perf_events: int = 0
    # starts the process the probes are handed to at the stop (False: it did not start)
    release: Callable[[list[int], list[str]], bool] = field(default=lambda fds, uprobes: start_release(fds, uprobes))
    _perf_lost: dict[str, int] = field(default_factory=dict)
    _callbacks: list[object] = field(default_factory=list)  # keep ctypes callbacks alive
    _detaching: list[threading.Thread] = field(default_factory=list)
    _detach_begun: bool = False
    _attach_lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False
    _rings: RingSet = field(default_factory=RingSet)  # ring buffers read in bulk (agent/ebpf/ringbuf.py)

    # ------------------------------------------------------------ Programs --

    def map(self, name: str) -> BpfMap:
        """A map of the loaded programs; KeyError when no program declares it."""
        if self._closed:
            raise KeyError(f"{name}: the BPF programs are closed")
        return BpfMap(self.bpf[name], name)

    def attach_uprobe(self, path: str, symbol: str, fn_name: str, *, ret: bool = False,
                      addr: int | None = None, pid: int = -1) -> None:
        shown = symbol if addr is None else f"{symbol}@{addr:#x}"
        with self._attach_lock:
            if self._detach_begun:  # begin_detach has taken its list: this one would stay
                raise ProgramsClosing(f"{fn_name} on {path}:{shown}: the programs are being detached")
            # `symbol` only names a probe put at `addr` (a versioned symbol's, or a stripped Go
            # binary's function or RET address)
            try:
                _attach_uprobe(self.bpf, path, None if addr is not None else symbol, addr, fn_name, ret, pid)
            except Exception as e:  # noqa: BLE001 - BCC raises bare Exception for every failure
                hint = ""
                if "Invalid argument" in str(e) or "Failed to attach" in str(e):
                    hint = (" (if the kernel log says 'ref_ctr_offset mismatch', another tracer holds a"
                            " uprobe at this place of this file with a USDT reference counter; it must"
                            " detach first)")
                raise AttachError(f"{'uretprobe' if ret else 'uprobe'} {fn_name} on {path}:{shown}: {e}{hint}") from e

    def detach_uprobe(self, path: str, symbol: str, *, ret: bool = False, addr: int | None = None,
                      pid: int = -1) -> None:
        detach = self.bpf.detach_uretprobe if ret else self.bpf.detach_uprobe
        with self._attach_lock:  # not while begin_detach takes its list: it detaches them all
            if self._detach_begun:
                raise ProgramsClosing(f"{path}:{symbol}: the programs are being detached")
            where: dict[str, Any] = {"addr": addr} if addr is not None else {"sym": symbol}
            if pid != -1:
                where["pid"] = pid
            try:
                detach(name=path, **where)
            except Exception as e:  # noqa: BLE001
                raise AttachError(f"{'uretprobe' if ret else 'uprobe'} on {path}:{symbol}: {e}") from e

    # ------------------------------------------------------------- loading --

    @property
    def tracepoints(self) -> list[str]:
        """Attached tracepoints; raw ones as 'raw:<name>'."""
        names = [_name(k) for k in self.bpf.tracepoint_fds]
        names += ["raw:" + _name(k) for k in self.bpf.raw_tracepoint_fds]
        return sorted(names)

    def missed_runs(self) -> dict[str, int]:
        """Runs the kernel skipped per program (recursion_misses: a program that fired while
        another BPF program ran on that CPU). Each is an event that was not seen."""
        out = {}
        for fname, fn in list(self.bpf.funcs.items()):
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            out[_name(fname)] = int(line.split()[1])
            except (OSError, ValueError):
                continue
        return out

    def poll(self, timeout_ms: int) -> None:
        """Handle events as they come, waiting at most `timeout_ms`, then drain every ring: a
        buffer written without wake-ups (bpf/l7.c wakes user space once per batch) is read on
        any wake-up and at least every `timeout_ms`. Per-event wake-ups of the other buffers
        keep them close to the order things happened (a process's exit after the close and
        failed-connect events it caused, which travel in another buffer)."""
        if self._closed:
            time.sleep(timeout_ms / 1000)
        elif self._rings.rings:
            self._rings.poll(timeout_ms)
        elif self.ringbuf:
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
        try:
            for name in self.families:
                for buf in FAMILIES[name].buffers:
                    kernel_side = self.map(f"{buf}_lost").percpu_sum(0)
                    out[buf] = kernel_side + self._perf_lost.get(buf, 0)
        except KeyError:  # closed meanwhile (a scrape racing the stop)
            return {}
        return out

    def run_seconds(self) -> dict[str, tuple[int, int]]:
        """(run time ns, run count) per attached program, from kernel.bpf_stats_enabled."""
        out = {}
        for fname, fn in list(self.bpf.funcs.items()):
            info = _prog_info(fn.fd)
            if info:
                out[_name(fname)] = info
        return out

    # ------------------------------------------------------------ stopping --

    def begin_detach(self) -> None:
        """Hand every probe to a process that detaches them after the agent has exited
        (agent/ebpf/release.py), and return at once; if that process cannot start, detach them
        here, side by side, and `close()` waits for that.

        Each detach waits in the kernel for RCU grace periods, serialised under the kernel's
        trace event lock (~70 ms a tracepoint one after the other, ~40 ms side by side, ~130 ms a
        uprobe here): the ~40 probes took 1.6-2 s of the 2-second stop. Maps and buffers stay:
        what is in them can still be read."""
        b = self.bpf
        with self._attach_lock:
            if self._detach_begun:
                return
            self._detach_begun = True  # from now on nothing attaches
            if self._hand_over():
                return
            jobs: list[Callable[[], None]] = []
            jobs += [functools.partial(b.detach_uprobe_event, k) for k in list(b.uprobe_fds)]
            jobs += [functools.partial(b.detach_tracepoint, k) for k in list(b.tracepoint_fds)]
            jobs += [functools.partial(b.detach_raw_tracepoint, k) for k in list(b.raw_tracepoint_fds)]
            jobs += [functools.partial(b.detach_perf_event, *k) for k in list(b.open_perf_events)]
        per = max(1, -(-len(jobs) // DETACH_THREADS))
        for i in range(0, len(jobs), per):
            t = threading.Thread(target=_run_all, args=(jobs[i:i + per],), name="bpf-detach", daemon=True)
            t.start()
            self._detaching.append(t)

    def _hand_over(self) -> bool:
        """Start agent.ebpf.release with every probe's perf event descriptor, then close ours
        and forget them (BCC's cleanup must not detach them again). False: it did not start."""
        b = self.bpf
        fds = [*b.tracepoint_fds.values(), *b.raw_tracepoint_fds.values(), *b.uprobe_fds.values(),
               *(fd for per_cpu in b.open_perf_events.values() for fd in per_cpu.values())]
        if not fds:
            return True
        uprobes = [ev.decode() if isinstance(ev, bytes) else str(ev) for ev in b.uprobe_fds]
        if not self.release(fds, uprobes):
            return False
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        b.tracepoint_fds.clear()
        b.raw_tracepoint_fds.clear()
        b.uprobe_fds.clear()
        b.open_perf_events.clear()
        log.info("probes (%d perf event descriptors) handed to a process that detaches them after the agent exits", len(fds))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Detach every probe (if `begin_detach` has not) and free the maps. Safe to call twice."""
        if self._closed:
            return
        self.begin_detach()
        deadline = time.monotonic() + timeout
        for t in self._detaching:
            t.join(max(0.0, deadline - time.monotonic()))
        self._closed = True
        self._rings.close()
        try:
            self.bpf.cleanup()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.exception("detaching probes")


@functools.cache
def _deferred_bpf() -> Any:
    """BCC's BPF class, but the constructor leaves the attach of the `tracepoint__*` programs
    (BCC's autoload) to `attach_auto()`: they tail-call into programs the loader puts in their
    arrays after the compile (the verifier takes ~3.5 s over L7's two), and a hooked syscall in
    between would fail its tail call (counted as a lost hand-off: ~230 of a busy connection's
    writes at each start)."""
    from bcc import BPF

    class DeferredBPF(BPF):  # type: ignore[misc]  # bcc ships no type information
        _deferred = True  # a class attribute: BPF.__init__ calls _trace_autoload before any of ours is set

        def _trace_autoload(self) -> None:
            if not self._deferred:
                super()._trace_autoload()

        def attach_auto(self) -> None:
            self._deferred = False
            super()._trace_autoload()

    return DeferredBPF


@functools.cache
def _bpf_attach_uprobe() -> Callable[..., int]:
    """libbcc's bpf_attach_uprobe with its real prototype: seven arguments, the last the USDT
    reference counter's offset in the file (0: none). BCC's Python binding (0.26, Debian 12)
    declares and passes only six, so the kernel reads whatever the stack holds as that offset:
    it then increments and decrements a 16-bit "semaphore" at that offset of the file in every
    process that maps it (memory that is not one), refuses any other uprobe at the same place
    with a different offset ("ref_ctr_offset mismatch"), and when the decrement fails leaks the
    uprobe until reboot. Called through this prototype, the offset is 0."""
    from bcc.libbcc import lib

    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                             ctypes.c_ulonglong, ctypes.c_int, ctypes.c_uint32)
    return proto(("bpf_attach_uprobe", lib))


def _attach_uprobe(bpf: Any, path: str, symbol: str | None, addr: int | None, fn_name: str, ret: bool,
                   pid: int) -> None:
    """BCC's attach_uprobe/attach_uretprobe, with a reference counter offset of 0 (see
    _bpf_attach_uprobe). The probe is recorded in BCC's table under BCC's event name, so BCC's
    detach_uprobe_event and cleanup undo it as they undo their own."""
    from bcc import BPF

    bpath, baddr = BPF._check_path_symbol(path.encode(), (symbol or "").encode(), addr, pid)
    bpf._check_probe_quota(1)
    fn = bpf.load_func(fn_name.encode(), BPF.KPROBE)
    ev_name = bpf._get_uprobe_evname(b"r" if ret else b"p", bpath, baddr, pid)
    fd = _bpf_attach_uprobe()(fn.fd, 1 if ret else 0, ev_name, bpath, baddr, pid, 0)
    if fd < 0:
        # Without CAP_SYS_ADMIN libbcc defines the probe in tracing/uprobe_events first, and a
        # failed attach leaves that definition behind (one per failure, for good): remove it.
        from bcc.libbcc import lib

        lib.bpf_detach_uprobe(ev_name)
        raise Exception(f"Failed to attach BPF to {'uretprobe' if ret else 'uprobe'}")  # noqa: TRY002 - as BCC's
    bpf._add_uprobe_fd(ev_name, fd)


def start_release(fds: list[int], uprobes: list[str]) -> bool:
    """Start agent.ebpf.release with these perf event descriptors (inherited) and BCC's names of
    these uprobe events; False when it cannot start."""
    argv, cwd = module_command("agent.ebpf.release", "--agent-pid", str(os.getpid()),
                               *(f"--fd={fd}" for fd in fds), *(f"--uprobe-event={ev}" for ev in uprobes))
    try:
        subprocess.Popen(argv, pass_fds=fds, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError as e:
        log.warning("cannot start the process that detaches the probes (%s): detaching them here", e)
        return False
    return True


def _run_all(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        try:
            job()
        except Exception as e:  # noqa: BLE001 - one probe that will not detach must not keep the others
            log.warning("detaching a probe: %s", e)


def _name(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key


class BpfStats(Component):
    """The loaded programs' own health as self-metrics; frees the programs at close, after the
    components listed after it (which read the maps) have closed."""

    name = "bpf"

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded

    def self_metrics(self, f: Families) -> None:
        bpf = self.loaded
        if bpf._closed:
            return
        for buf, n in bpf.lost().items():
            f.counter("coroot_agent_lost_events_total", "events the kernel could not hand to the agent (full buffer)", n, what=buf)
        f.gauge("coroot_agent_bpf_compile_seconds", "time to compile and attach the BPF programs", bpf.compile_seconds)
        for prog, (ns, runs) in bpf.run_seconds().items():
            if runs:  # only with kernel.bpf_stats_enabled=1
                f.counter("coroot_agent_bpf_program_run_seconds_total", "time spent in the program (kernel.bpf_stats_enabled)", ns / 1e9, program=prog)
                f.counter("coroot_agent_bpf_program_runs_total", "program runs (kernel.bpf_stats_enabled)", runs, program=prog)
        for prog, n in bpf.missed_runs().items():
            f.counter("coroot_agent_bpf_missed_runs_total", "program runs the kernel skipped (it fired while another BPF program ran on that CPU)", n, program=prog)

    def close(self) -> None:
        self.loaded.close()


def _prog_info(fd: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields.get("run_time_ns", "0")), int(fields.get("run_cnt", "0"))
    except (OSError, ValueError):
        return None


def load(
    families: Iterable[str],
    handlers: Mapping[str, Handler],
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
    for name, value in headers.env:
        os.environ[name] = value
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
        bpf = _deferred_bpf()(text=text, cflags=cflags)
    except Exception as e:  # BCC raises bare Exception on compile/attach errors
        raise LoadError(f"probe families {', '.join(families)}: {e}") from e
    took = time.monotonic() - t0
    loaded = Loaded(bpf=bpf, families=families, ringbuf=ringbuf, compile_seconds=took)
    for name in families:
        for array, fn, kind in FAMILIES[name].tail_calls:  # before the programs that call them attach
            try:
                prog = bpf.load_func(fn, {"tracepoint": BPF.TRACEPOINT, "kprobe": BPF.KPROBE,
                                             "perf_event": BPF.PERF_EVENT}[kind])
                bpf[array][ctypes.c_int(0)] = ctypes.c_int(prog.fd)
            except Exception as e:  # noqa: BLE001
                raise LoadError(f"probe family {name}: cannot load {fn} into {array}: {e}") from e
    try:  # the tracepoint__ programs, now that what they tail-call is in place
        bpf.attach_auto()
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"probe families {', '.join(families)}: {e}") from e
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
    if loaded.ringbuf and bulk_rings_supported():  # read from its mapping, many records a call
        loaded._rings.add(table.map_fd, Ring.open(table.map_fd, table.max_entries, handler))
    elif loaded.ringbuf:
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
