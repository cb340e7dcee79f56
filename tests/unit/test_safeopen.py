"""agent.logs.safeopen: a path inside a root opens only a regular file under the prefix there,
through openat2 and through the component walk alike. The device case makes a /dev/null node
with mknod, which needs root: like the system tests, it fails (not skips) without it."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.containers.registry import Container
from agent.logs import collector as collector_mod
from agent.logs import safeopen
from agent.logs.collector import LOG_OPEN_EVENT, MAX_PENDING_OPENS, LogCollector, decode_open
from agent.logs.safeopen import Refused, open_in_root, open_proc_fd
from agent.logs.tailer import Tailer
from agent.metrics import Families

WAYS = [pytest.param(True, id="openat2"), pytest.param(False, id="walk")]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A process root: /var/log/app.log (regular), /etc/secret outside the log directory."""
    r = tmp_path / "root"
    (r / "var" / "log" / "sub").mkdir(parents=True)
    (r / "etc").mkdir()
    (r / "var" / "log" / "app.log").write_text("line 1\n")
    (r / "var" / "log" / "sub" / "deep.log").write_text("deep\n")
    (r / "etc" / "secret").write_text("inside the root, outside /var/log\n")
    (tmp_path / "host-secret").write_text("outside the root\n")
    yield r


def read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def test_openat2_is_there_on_this_kernel() -> None:
    # The fast path is what runs on 5.6+; the walk is tested on its own below.
    assert safeopen._openat2.available


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_regular_file_under_the_prefix_is_opened_read_only_and_non_blocking(root: Path, use_openat2: bool) -> None:
    fd = open_in_root(str(root), "/var/log/app.log", "/var/log/", use_openat2)
    assert (os.get_blocking(fd), fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) == (False, os.O_RDONLY)
    assert read(fd) == b"line 1\n"


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_symlink_that_stays_under_the_prefix_is_followed(root: Path, use_openat2: bool) -> None:
    (root / "var" / "log" / "current.log").symlink_to("sub/deep.log")
    (root / "var" / "log" / "abs.log").symlink_to("/var/log/sub/deep.log")
    assert read(open_in_root(str(root), "/var/log/current.log", "/var/log/", use_openat2)) == b"deep\n"
    assert read(open_in_root(str(root), "/var/log/abs.log", "/var/log/", use_openat2)) == b"deep\n"


@pytest.mark.parametrize("use_openat2", WAYS)
@pytest.mark.parametrize("target", ["/etc/secret", "../../etc/secret", "sub/../../../etc/secret"])
def test_a_symlink_out_of_the_prefix_is_refused(root: Path, use_openat2: bool, target: str) -> None:
    (root / "var" / "log" / "evil.log").symlink_to(target)
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/var/log/evil.log", "/var/log/", use_openat2)
    assert e.value.reason == "outside"
    assert "resolves to /etc/secret" in str(e.value)


@pytest.mark.parametrize("use_openat2", WAYS)
@pytest.mark.parametrize("target", ["HOST", "../../../../../../../HOST", "/../../../HOST"])
def test_a_symlink_cannot_leave_the_root(root: Path, use_openat2: bool, target: str) -> None:
    """Even with a prefix of / (anything in the root): the host file outside it is never reached."""
    host = root.parent / "host-secret"
    target = target.replace("HOST", str(host)) if target == "HOST" else target.replace("HOST", "host-secret")
    (root / "var" / "log" / "evil.log").symlink_to(target)
    with pytest.raises(OSError) as e:
        open_in_root(str(root), "/var/log/evil.log", "/", use_openat2)
    assert e.value.errno == errno.ENOENT  # resolved inside the root, where there is no such file


@pytest.mark.parametrize("path", ["/var/log/../../etc/secret", "/var/log/../log/app.log", "/var/log/sub/../app.log"])
def test_dotdot_is_refused_before_anything_is_looked_at(root: Path, path: str) -> None:
    with pytest.raises(Refused) as e:
        open_in_root(str(root / "does-not-exist"), path, "/var/log/")
    assert e.value.reason == "dotdot"


def test_a_relative_path_or_one_outside_the_prefix_is_refused(root: Path) -> None:
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "var/log/app.log", "/var/log/")
    assert e.value.reason == "relative"
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/etc/secret", "/var/log/")
    assert e.value.reason == "outside"
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/var/logx/app.log", "/var/log/")
    assert e.value.reason == "outside"


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_fifo_is_refused_at_once_without_opening_it(root: Path, use_openat2: bool) -> None:
    fifo = root / "var" / "log" / "pipe.log"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/var/log/pipe.log", "/var/log/", use_openat2)
    assert time.monotonic() - t0 < 0.5
    assert e.value.reason == "not_regular" and "(fifo)" in str(e.value)
    # Nobody opened the FIFO: a writer opening it non-blocking finds no reader.
    with pytest.raises(OSError) as w:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert w.value.errno == errno.ENXIO


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_symlink_to_a_fifo_is_refused(root: Path, use_openat2: bool) -> None:
    os.mkfifo(root / "var" / "log" / "sub" / "pipe")
    (root / "var" / "log" / "via.log").symlink_to("sub/pipe")
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/var/log/via.log", "/var/log/", use_openat2)
    assert e.value.reason == "not_regular"


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_socket_is_refused(root: Path, use_openat2: bool) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "var" / "log" / "sock.log"))
        with pytest.raises(Refused) as e:
            open_in_root(str(root), "/var/log/sock.log", "/var/log/", use_openat2)
    assert e.value.reason == "not_regular" and "(socket)" in str(e.value)


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_device_is_refused(root: Path, use_openat2: bool) -> None:
    dev = root / "var" / "log" / "null.log"
    if os.geteuid() != 0:
        pytest.fail("the device case needs root (mknod): run the unit tests as root")
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/var/log/null.log", "/var/log/", use_openat2)
    assert e.value.reason == "not_regular" and "(character device)" in str(e.value)


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_directory_is_refused(root: Path, use_openat2: bool) -> None:
    with pytest.raises(Refused) as e:
        open_in_root(str(root), "/var/log/sub", "/var/log/", use_openat2)
    assert e.value.reason == "not_regular" and "(directory)" in str(e.value)


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_symlink_loop_ends_with_eloop(root: Path, use_openat2: bool) -> None:
    (root / "var" / "log" / "a.log").symlink_to("b.log")
    (root / "var" / "log" / "b.log").symlink_to("a.log")
    with pytest.raises(OSError) as e:
        open_in_root(str(root), "/var/log/a.log", "/var/log/", use_openat2)
    assert e.value.errno == errno.ELOOP


@pytest.mark.parametrize("use_openat2", WAYS)
def test_a_magic_link_in_the_root_is_read_as_text_not_followed(root: Path, use_openat2: bool) -> None:
    """/proc/self/fd/N inside the root is a symlink to a path as text: resolved in the root."""
    secret = os.open(root.parent / "host-secret", os.O_RDONLY)
    try:
        (root / "var" / "log" / "magic.log").symlink_to(f"/proc/{os.getpid()}/fd/{secret}")
        with pytest.raises(OSError) as e:
            open_in_root(str(root), "/var/log/magic.log", "/", use_openat2)
        assert e.value.errno == errno.ENOENT  # no /proc inside this root
        # A root that does have /proc (the host's): the magic link's text is resolved, not jumped.
        os.symlink(f"/proc/{os.getpid()}/fd/{secret}", root / "var" / "log" / "magic2.log")
        with pytest.raises(Refused) as e2:
            open_in_root("/", str(root / "var" / "log" / "magic2.log"), str(root / "var" / "log"), use_openat2)
        assert e2.value.reason == "outside"
    finally:
        os.close(secret)


def test_a_path_swapped_for_a_fifo_while_a_writer_waits_does_not_block(root: Path) -> None:
    """A FIFO with a writer blocked on it: still refused at once, and the writer stays blocked."""
    fifo = root / "var" / "log" / "pipe.log"
    os.mkfifo(fifo)
    w = subprocess.Popen(["sh", "-c", f"echo x > {fifo}"])
    try:
        time.sleep(0.1)
        done = threading.Event()
        err: list[BaseException] = []

        def go() -> None:
            try:
                open_in_root(str(root), "/var/log/pipe.log", "/var/log/")
            except BaseException as e:  # noqa: BLE001
                err.append(e)
            done.set()

        threading.Thread(target=go, daemon=True).start()
        assert done.wait(1.0)
        assert isinstance(err[0], Refused) and err[0].reason == "not_regular"
        assert w.poll() is None  # nobody opened the read end
    finally:
        w.kill()
        w.wait()


def test_the_file_a_process_holds_is_opened_by_its_descriptor(root: Path) -> None:
    """open_proc_fd with our own process: the path the kernel reports, the very inode."""
    fd = os.open(root / "var" / "log" / "app.log", os.O_WRONLY | os.O_APPEND)
    try:
        got, seen = open_proc_fd("/proc", os.getpid(), fd, str(root / "var" / "log"))
        assert seen == str(root / "var" / "log" / "app.log")
        assert os.fstat(got).st_ino == os.fstat(fd).st_ino
        assert read(got) == b"line 1\n"
        with pytest.raises(Refused) as e:
            open_proc_fd("/proc", os.getpid(), fd, str(root / "etc"))
        assert e.value.reason == "outside"
    finally:
        os.close(fd)


def test_a_fifo_a_process_holds_is_refused_by_stat_not_open(root: Path) -> None:
    fifo = root / "var" / "log" / "pipe.log"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # holds both ends: never blocks
    try:
        t0 = time.monotonic()
        with pytest.raises(Refused) as e:
            open_proc_fd("/proc", os.getpid(), fd, str(root / "var" / "log"))
        assert time.monotonic() - t0 < 0.5 and e.value.reason == "not_regular"
    finally:
        os.close(fd)


def test_a_closed_descriptor_is_file_not_found() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(FileNotFoundError):
        open_proc_fd("/proc", os.getpid(), r, "/var/log/")


def test_a_deleted_file_a_process_holds_is_refused(root: Path) -> None:
    p = root / "var" / "log" / "gone.log"
    p.write_text("x\n")
    fd = os.open(p, os.O_WRONLY)
    os.unlink(p)
    try:
        with pytest.raises(Refused) as e:
            open_proc_fd("/proc", os.getpid(), fd, str(root / "var" / "log"))
        assert e.value.reason == "outside"
    finally:
        os.close(fd)


def test_a_path_without_symlinks_is_resolved_by_openat2_alone(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_walk(*_a: object) -> int:
        raise AssertionError("walked")

    monkeypatch.setattr(safeopen, "_walk", no_walk)
    assert read(open_in_root(str(root), "/var/log/sub/deep.log", "/var/log/")) == b"deep\n"
    (root / "var" / "log" / "link.log").symlink_to("sub/deep.log")
    with pytest.raises(AssertionError, match="walked"):  # a symlink: ELOOP, then the walk
        open_in_root(str(root), "/var/log/link.log", "/var/log/")


# ----------------------------------------------- the log collector's use of it --

class FakeRegistry:
    """Every pid is in one container; counts what the event-poll thread must never touch."""

    procfs = "/proc"

    def __init__(self) -> None:
        self.c = Container("/system.slice/app.service", "app", "systemd", "/system.slice/app.service", {}, 0.0)
        self.touched = 0

    def container_of(self, pid: int) -> Container:
        self.touched += 1
        return self.c

    def container(self, cid: str) -> Container:
        return self.c

    def containers(self) -> list[Container]:
        return [self.c]

    def pids(self) -> list[int]:
        return []


@pytest.fixture
def collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LogCollector, FakeRegistry, Path]]:
    logdir = tmp_path / "log"
    logdir.mkdir()
    monkeypatch.setattr(collector_mod, "LOG_DIR", str(logdir) + "/")
    reg = FakeRegistry()
    c = LogCollector(reg, None, journald=False, pods_dir=str(tmp_path / "pods"), docker_dir=str(tmp_path / "docker"))  # type: ignore[arg-type]
    yield c, reg, logdir
    c.close()


def event(pid: int, fd: int, path: str, flags: int = os.O_WRONLY) -> bytes:
    return LOG_OPEN_EVENT.pack(pid, fd, flags, path.encode())


def series(c: LogCollector, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    f = Families({})
    c.collect(f)
    c.self_metrics(f)
    return {tuple(sorted(s.labels.items())): s.value for m in f for s in m.samples if s.name == name}


def test_an_open_event_is_only_queued_on_the_poll_thread(collector: tuple[LogCollector, FakeRegistry, Path]) -> None:
    c, reg, logdir = collector
    t0 = time.monotonic()
    for i in range(MAX_PENDING_OPENS + 5):
        c.handle_event(event(10_000_000 + i, 3, f"{logdir}/x.log"))
    assert time.monotonic() - t0 < 1.0
    assert reg.touched == 0  # no registry read, no file looked at
    assert c.dropped_opens == 5 and len(c._opens) == MAX_PENDING_OPENS
    assert c._opens[0].pid == 10_000_005  # the oldest went
    assert series(c, "coroot_agent_dropped_events_total") == {(("what", "log_open"),): 5.0}


@pytest.mark.parametrize("raw", [b"", b"\x01" * 10, LOG_OPEN_EVENT.pack(0, 3, 1, b"/var/log/x"),
                                 LOG_OPEN_EVENT.pack(5, -1, 1, b"/var/log/x"), b"\xff" * 300])
def test_a_malformed_open_event_is_dropped_without_raising(raw: bytes) -> None:
    assert decode_open(raw) is None


def test_a_held_regular_file_is_followed_by_its_kernel_path(collector: tuple[LogCollector, FakeRegistry, Path]) -> None:
    c, _, logdir = collector
    fd = os.open(logdir / "app.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"ERROR one\nERROR two\n")
        c.handle_event(event(os.getpid(), fd, f"{logdir}/./app.log"))
        c._drain_opens()
        c._drain_opens()  # what the logs thread does each round
        c.pump()
        c.flush()  # the multi-line joiner holds a last line until it knows it is whole
        assert [k for k in c._sources] == [("/system.slice/app.service", f"{logdir}/app.log")]
        assert c.records == 2  # a new file: read whole
    finally:
        os.close(fd)


def test_a_held_fifo_dotdot_or_outside_file_is_refused_and_counted(
        collector: tuple[LogCollector, FakeRegistry, Path], tmp_path: Path) -> None:
    c, _, logdir = collector
    os.mkfifo(logdir / "pipe.log")
    (tmp_path / "secret").write_text("ERROR secret\n")
    (logdir / "evil.log").symlink_to(tmp_path / "secret")
    fifo = os.open(logdir / "pipe.log", os.O_RDWR | os.O_NONBLOCK)
    evil = os.open(logdir / "evil.log", os.O_WRONLY)
    legit = os.open(logdir / "ok.log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        c.handle_event(event(os.getpid(), fifo, f"{logdir}/pipe.log"))
        c.handle_event(event(os.getpid(), evil, f"{logdir}/evil.log"))
        c.handle_event(event(os.getpid(), legit, f"{logdir}/../log/ok.log"))
        c._drain_opens()
        assert c._sources == {}
        assert dict(c.refused) == {"not_regular": 1, "outside": 1, "dotdot": 1}
        assert series(c, "coroot_agent_log_files_refused_total") == {
            (("reason", "dotdot"),): 1.0, (("reason", "not_regular"),): 1.0, (("reason", "outside"),): 1.0}
    finally:
        for fd in (fifo, evil, legit):
            os.close(fd)


def test_a_closed_descriptor_falls_back_to_the_path_in_the_process_root(
        collector: tuple[LogCollector, FakeRegistry, Path], tmp_path: Path) -> None:
    c, _, logdir = collector
    (logdir / "gone.log").write_text("ERROR a\n")
    (tmp_path / "secret").write_text("ERROR secret\n")
    (logdir / "evil.log").symlink_to(tmp_path / "secret")
    c.handle_event(event(os.getpid(), 1_000_000, f"{logdir}/evil.log"))  # no such fd: the path, refused
    c.handle_event(event(os.getpid(), 1_000_001, f"{logdir}/gone.log"))  # no such fd: the path, followed
    c._drain_opens()
    c._drain_opens()  # what the logs thread does each round
    c.pump()
    c.flush()
    assert list(c._sources) == [("/system.slice/app.service", f"{logdir}/gone.log")]
    assert dict(c.refused) == {"outside": 1} and c.records == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_open_event_decoding_never_raises(raw: bytes) -> None:
    ev = decode_open(raw)
    assert ev is None or (ev.pid > 0 and ev.fd >= 0 and isinstance(ev.path, str))


def test_a_runtime_file_that_is_a_symlink_out_of_its_directory_is_refused_once(
        collector: tuple[LogCollector, FakeRegistry, Path], tmp_path: Path) -> None:
    c, _, _ = collector
    pod = tmp_path / "pods" / "ns_web_0123" / "app"
    pod.mkdir(parents=True)
    (tmp_path / "secret").write_text("ERROR secret\n")
    (pod / "0.log").symlink_to(tmp_path / "secret")
    c.scan()
    c.scan()  # unchanged: not counted again
    assert c._sources == {} and dict(c.refused) == {"runtime_file": 1}
    (pod / "0.log").unlink()
    (pod / "0.log").write_text("2024-05-01T10:00:00.000000000Z stdout F ERROR real\n")
    c.scan()
    c._drain_opens()  # what the logs thread does each round
    c.pump()
    c.flush()
    assert list(c._sources) == [("/k8s/ns/web/app", str(pod / "0.log"))] and c.records == 1


def test_a_rotated_path_swapped_for_a_symlink_or_fifo_is_not_followed_by_the_tailer(tmp_path: Path) -> None:
    logdir = tmp_path / "log"
    logdir.mkdir()
    (tmp_path / "secret").write_text("ERROR secret\n")
    p = logdir / "app.log"
    p.write_text("")
    t = Tailer(str(p), root="/", prefix=str(logdir))
    assert t.open(from_end=True)
    with open(p, "a") as f:
        f.write("one\n")
    assert t.poll() == ["one"]
    os.rename(p, logdir / "app.log.1")
    p.symlink_to(tmp_path / "secret")  # out of the log directory
    with open(logdir / "app.log.1", "a") as f:
        f.write("two\n")
    assert t.poll() == ["two"] and t.poll() == []
    p.unlink()
    os.mkfifo(p)
    t0 = time.monotonic()
    assert t.poll() == [] and t.poll() == []
    assert time.monotonic() - t0 < 0.5
    assert (t.refused, t.rotations) == (1, 0)  # refused once, not on every poll
    p.unlink()
    p.write_text("three\n")  # a real file again: a rotation, read from its start
    assert t.poll() == ["three"]
    assert (t.refused, t.rotations) == (1, 1)
    t.close()


def test_a_followed_file_found_again_under_its_new_name_is_not_followed_twice(
        collector: tuple[LogCollector, FakeRegistry, Path]) -> None:
    c, _, logdir = collector
    fd = os.open(logdir / "app.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"ERROR one\n")
        c.handle_event(event(os.getpid(), fd, f"{logdir}/app.log"))
        c._drain_opens()
        os.rename(logdir / "app.log", logdir / "app.log.1")  # the path now names nothing
        os.write(fd, b"ERROR two\n")
        c.handle_event(event(os.getpid(), fd, f"{logdir}/app.log.1"))  # as the rescan sees it
        c._drain_opens()
        c._drain_opens()  # what the logs thread does each round
        c.pump()
        c.flush()
        assert list(c._sources) == [("/system.slice/app.service", f"{logdir}/app.log")]
        assert c.records == 2
    finally:
        os.close(fd)
