"""check's listen row: a port held by our own agent (its store lock names the address and a
live coroot-agent pid) is ok; any other holder fails."""

from __future__ import annotations

import socket
from pathlib import Path

from agent import check
from agent.config import load
from agent.query import StoreLock


def _cfg(tmp_path: Path, port: int):  # noqa: ANN202 - Config
    empty = tmp_path / "agent.yaml"
    empty.write_text("{}\n")
    return load({"listen": f"127.0.0.1:{port}", "storage_path": str(tmp_path / "store")},
                environ={}, config_path=str(empty))


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _procfs(tmp_path: Path, pid: int, argv: list[str]) -> str:
    d = tmp_path / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return str(tmp_path / "proc")


def test_free_port_ok(tmp_path: Path) -> None:
    s = _listener()
    port = s.getsockname()[1]
    s.close()
    row = check._listen_row(_cfg(tmp_path, port))
    assert (row.status, row.detail) == ("ok", f"127.0.0.1:{port} is free")


def test_foreign_holder_fails(tmp_path: Path) -> None:
    s = _listener()
    port = s.getsockname()[1]
    try:
        row = check._listen_row(_cfg(tmp_path, port))
    finally:
        s.close()
    assert row.status == "FAIL"
    assert row.detail == f"127.0.0.1:{port}: in use by another process"


def test_lock_names_our_agent(tmp_path: Path) -> None:
    s = _listener()
    port = s.getsockname()[1]
    cfg = _cfg(tmp_path, port)
    lock = StoreLock.for_config(cfg)
    assert lock.acquire({"pid": 4242, "listen": f"127.0.0.1:{port}", "socket": "x"})
    try:
        for argv in (["/opt/venv/bin/python3", "/usr/local/bin/coroot-agent", "run"],
                     ["/opt/venv/bin/python", "-m", "agent", "run", "--listen", "x"]):
            procfs = _procfs(tmp_path / argv[1].strip("/-"), 4242, argv)
            assert check.own_agent_on(cfg, "127.0.0.1", port, procfs) == 4242
        # the same pid running something else, a dead pid, another address: not ours
        procfs = _procfs(tmp_path / "other", 4242, ["/usr/sbin/nginx", "-g", "daemon off;"])
        assert check.own_agent_on(cfg, "127.0.0.1", port, procfs) is None
        assert check.own_agent_on(cfg, "127.0.0.1", port, str(tmp_path / "empty")) is None
        procfs = _procfs(tmp_path / "ok", 4242, ["/usr/local/bin/coroot-agent"])
        assert check.own_agent_on(cfg, "127.0.0.1", port + 1, procfs) is None
        # the real /proc has no coroot-agent at pid 4242 (or not this one): the row fails
        assert check._listen_row(cfg).status == "FAIL"
    finally:
        lock.release()
        s.close()


def test_unheld_or_garbage_lock_is_not_ours(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, 1)
    procfs = _procfs(tmp_path, 4242, ["/usr/local/bin/coroot-agent"])
    assert check.own_agent_on(cfg, "127.0.0.1", 1, procfs) is None  # no lock file
    lock = StoreLock.for_config(cfg)
    for info in ({"pid": "4242", "listen": "127.0.0.1:1"}, {"pid": 4242, "listen": 1},
                 {"pid": True, "listen": "127.0.0.1:1"}, {"listen": "127.0.0.1:1"},
                 {"pid": 4242, "listen": "127.0.0.1:x"}):
        assert lock.acquire(info)
        try:
            assert check.own_agent_on(cfg, "127.0.0.1", 1, procfs) is None, info
        finally:
            lock.release()
    # written but no longer held: a stale lock from an agent that exited
    assert check.own_agent_on(cfg, "127.0.0.1", 1, procfs) is None
    assert lock.acquire({"pid": 4242, "listen": "[::1]:1"})
    try:
        assert check.own_agent_on(cfg, "::1", 1, procfs) == 4242
    finally:
        lock.release()
