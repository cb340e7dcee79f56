"""The namespace helper's request handling: whatever the agent's side of the socket pair sends,
the helper answers with an errno or one ICMP socket, and never raises. (The helper process under
its capabilities, against a real container namespace: tests/system/test_pinger.py.)"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.net.nsopener import MAX_PID, REPLY, REQUEST, answer, serve

LIBC = ctypes.CDLL(None, use_errno=True)
OWN_NS = os.stat("/proc/self/ns/net").st_ino


@pytest.fixture(scope="module")
def own_ns_fd() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def free_pid() -> int:
    for pid in range(MAX_PID - 1, 1, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid")


@pytest.mark.parametrize("request_bytes", [b"", b"\0" * 11, b"\0" * 13, REQUEST.pack(0, OWN_NS),
                                           REQUEST.pack(-1, OWN_NS), REQUEST.pack(MAX_PID, OWN_NS),
                                           REQUEST.pack(1, 0)])
def test_a_malformed_request_is_einval(request_bytes: bytes, own_ns_fd: int) -> None:
    assert answer(request_bytes, "/proc", own_ns_fd, LIBC.setns) == (errno.EINVAL, None, False)


def test_a_pid_that_does_not_exist_is_enoent(own_ns_fd: int) -> None:
    assert answer(REQUEST.pack(free_pid(), OWN_NS), "/proc", own_ns_fd, LIBC.setns)[0] == errno.ENOENT


def test_a_pid_now_in_another_namespace_than_expected_is_refused(own_ns_fd: int) -> None:
    """A recycled pid: the namespace the agent expects is not the one the process is in."""
    assert answer(REQUEST.pack(os.getpid(), OWN_NS + 1), "/proc", own_ns_fd, LIBC.setns) == (errno.ESTALE, None, False)


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN: the unit tests run as root in `make test`")
def test_the_expected_namespace_gives_an_icmp_socket(own_ns_fd: int) -> None:
    code, s, raw = answer(REQUEST.pack(os.getpid(), OWN_NS), "/proc", own_ns_fd, LIBC.setns)
    assert code == 0 and s is not None and raw  # root holds CAP_NET_RAW: a raw socket
    try:
        assert (s.family, s.type, s.proto) == (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        assert os.readlink("/proc/thread-self/ns/net") == f"net:[{OWN_NS}]"  # back in its own
    finally:
        s.close()


@given(st.binary(max_size=40))
def test_any_bytes_get_an_answer_and_never_raise(data: bytes) -> None:
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        code, s, _ = answer(data, "/proc", fd, lambda _fd, _kind: -1)  # setns refused: no namespace entered
        assert s is None and code != 0
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN: the unit tests run as root in `make test`")
def test_serve_passes_the_socket_and_ends_at_a_malformed_request() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t = threading.Thread(target=serve, args=(theirs, "/proc"))
    t.start()
    try:
        mine.sendall(REQUEST.pack(os.getpid(), OWN_NS))
        data, anc, _, _ = mine.recvmsg(REPLY.size, socket.CMSG_SPACE(4))
        assert REPLY.unpack(data)[0] == 0
        (fd,) = [struct.unpack("i", d)[0] for lvl, kind, d in anc if kind == socket.SCM_RIGHTS]
        with socket.socket(fileno=fd) as s:
            assert s.type == socket.SOCK_RAW
        mine.sendall(REQUEST.pack(free_pid(), OWN_NS))
        assert REPLY.unpack(mine.recv(16))[0] == errno.ENOENT
        mine.sendall(b"garbage")
        assert REPLY.unpack(mine.recv(16))[0] == errno.EINVAL
        t.join(timeout=5)
        assert not t.is_alive()
    finally:
        mine.close()
        theirs.close()

