"""ICMP sockets in other network namespaces, for an agent that gave up CAP_SYS_ADMIN.

The pinger measures a container's latency from the container's network namespace, which needs
setns(CLONE_NEWNET), i.e. CAP_SYS_ADMIN. The agent drops that capability once its probes are
attached. So that containers in their own namespaces (every Kubernetes pod) are still pinged,
the agent starts this small helper before the drop (`python -m agent.net.nsopener`), and the
helper keeps exactly three capabilities and does exactly one thing:

    request  (12 bytes): pid (int32), the inode of the network namespace the agent expects pid in
    reply    (5 bytes):  errno (int32, 0 = ok), raw (1 byte); on success the socket's fd
                         travels with it (SCM_RIGHTS)

It opens /proc/PID/ns/net (CAP_SYS_PTRACE for processes of other users), checks that it is the
namespace the agent expects (a recycled pid is refused with ESTALE), enters it (CAP_SYS_ADMIN),
opens an ICMP socket there (raw with CAP_NET_RAW, else a datagram ping socket), returns to its
own namespace and passes the socket back. It reads no other input: anything but a 12-byte
request ends it.

What the agent gains over its dropped capabilities is therefore only an ICMP socket in another
process's network namespace: without IP_HDRINCL, the kernel writes the IP header, so the socket
cannot forge a source address. The helper is reachable only through its end of a socket pair
the agent made (no listening socket, no other open file), is not dumpable (no ptrace, no
/proc/PID/fd by others), has no_new_privs set, and dies with the agent (PR_SET_PDEATHSIG) or
when the agent closes its end.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent import caps, module_command

log = logging.getLogger(__name__)

KEEP = frozenset({"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"})
REQUEST = struct.Struct("=iQ")
REPLY = struct.Struct("=iB")
CLONE_NEWNET = 0x40000000
SO_TIMESTAMPNS = 35
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT
TIMEOUT = 2.0  # seconds the agent waits for a reply


# ---------------------------------------------------------------- the helper ---

def open_icmp() -> tuple[socket.socket, bool]:
    """An ICMP socket in the current namespace: raw when allowed, else a ping socket."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True
    except PermissionError:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False


def answer(request: bytes, procfs: str, own_ns_fd: int,
           setns: Callable[[int, int], int]) -> tuple[int, socket.socket | None, bool]:
    """(errno, socket or None, raw) for one request. Never raises; a malformed request is EINVAL."""
    if len(request) != REQUEST.size:
        return errno.EINVAL, None, False
    pid, netns = REQUEST.unpack(request)
    if not 0 < pid < MAX_PID or netns <= 0:
        return errno.EINVAL, None, False
    try:
        fd = os.open(f"{procfs}/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return e.errno or errno.EIO, None, False
    try:
        if os.fstat(fd).st_ino != netns:
            return errno.ESTALE, None, False
        if setns(fd, CLONE_NEWNET) != 0:
            return ctypes.get_errno() or errno.EPERM, None, False
        try:
            s, raw = open_icmp()
        except OSError as e:
            return e.errno or errno.EIO, None, False
        finally:
            if setns(own_ns_fd, CLONE_NEWNET) != 0:  # never expected: stop rather than stay elsewhere
                os._exit(3)
        return 0, s, raw
    finally:
        os.close(fd)


def serve(conn: socket.socket, procfs: str) -> None:
    """Answer requests on `conn` until the agent closes it or sends something malformed."""
    libc = ctypes.CDLL(None, use_errno=True)
    own_ns_fd = os.open(f"{procfs}/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                request = conn.recv(REQUEST.size + 1)
            except OSError:
                return
            if not request:
                return
            code, s, raw = answer(request, procfs, own_ns_fd, libc.setns)
            try:
                if s is None:
                    conn.sendall(REPLY.pack(code, 0))
                else:
                    conn.sendmsg([REPLY.pack(0, int(raw))],
                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", s.fileno()))])
            except OSError:
                return
            finally:
                if s is not None:
                    s.close()
            if code == errno.EINVAL:
                return
    finally:
        os.close(own_ns_fd)


def confine() -> None:
    """Die with the agent, keep only KEEP, no_new_privs, not dumpable, named for `ps`."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the agent is gone already
        sys.exit(0)
    caps.drop_to(set(KEEP))
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(PR_SET_NAME, b"coroot-nsopener", 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.net.nsopener", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fd", type=int, required=True, help="this helper's end of the agent's socket pair")
    ap.add_argument("--procfs", default="/proc")
    args = ap.parse_args(argv)
    confine()
    conn = socket.socket(fileno=args.fd)
    serve(conn, args.procfs)
    return 0


# ---------------------------------------------------------------- the agent ---

@dataclass
class Opened:
    sock: socket.socket
    raw: bool


class NsOpener:
    """The agent's side: starts the helper (before the capability drop) and asks it for sockets."""

    def __init__(self, procfs: str = "/proc") -> None:
        self.procfs = procfs
        self._conn: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the helper; OSError when it cannot be started."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv, cwd = module_command("agent.net.nsopener", "--fd", str(theirs.fileno()), "--procfs", self.procfs)
        try:
            self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, cwd=cwd)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.settimeout(TIMEOUT)
        self._conn = mine

    def open_icmp(self, pid: int, netns: int) -> tuple[Opened | None, int]:
        """(an ICMP socket in pid's network namespace, 0), or (None, errno)."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return None, errno.ENOTCONN
            try:
                conn.sendall(REQUEST.pack(pid, netns))
                data, anc, _, _ = conn.recvmsg(REPLY.size, socket.CMSG_SPACE(struct.calcsize("i")))
            except OSError as e:  # the helper died or hangs: no more namespaces
                log.warning("pinger: the namespace helper does not answer (%s): containers in their own network "
                            "namespaces are not pinged any more", e)
                self._close_locked()
                return None, errno.ENOTCONN
        fds = [struct.unpack_from("i", d)[0] for lvl, kind, d in anc
               if lvl == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(d) >= 4]
        if len(data) != REPLY.size:
            for fd in fds:
                os.close(fd)
            return None, errno.EPROTO
        code, raw = REPLY.unpack(data)
        if code or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return None, code or errno.EPROTO
        return Opened(socket.socket(fileno=fds[0]), bool(raw)), 0

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


if __name__ == "__main__":
    sys.exit(main())
