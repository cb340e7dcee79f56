"""RabbitMQ against a real rabbitmq-server (Debian's, started once by the module with its own
port, node name, Erlang port mapper and directories under /tmp, in a test cgroup): publishers
and a consumer in test cgroups, librabbitmq's (amqp-tools: each frame its own send(); a
delivery read alone, or behind Consume-Ok) and a wire client that writes several messages at
once (tests/system/workloads/rabbitmq_client.py). The agent counts exactly what each published
and was given, as the node agent does: container_rabbitmq_messages_total{method="produce"|
"consume", status="ok"} for the client's container and its destination, no duration histogram,
nothing for the broker (the node agent has no inbound RabbitMQ family), no spans."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.system.helpers import AgentProcess, TestCgroups, free_port, wait_port
from tests.system.l7helpers import assert_messages_only, finish, start_client, wait_methods

pytestmark = pytest.mark.agent_without("profiling")  # tests/system/conftest.py: families its tests never read

CLIENT = [sys.executable, "-m", "tests.system.workloads.rabbitmq_client"]
FAMILY = "container_rabbitmq_messages_total"


@pytest.fixture(scope="module")
def broker(agent: AgentProcess) -> Iterator[tuple[int, str]]:
    """rabbitmq-server on loopback in its own cgroup, with its own Erlang port mapper (epmd),
    node name and directories: (AMQP port, container id). It takes ~10 s to start."""
    cg = TestCgroups()
    cid = cg.create("rabbitmq")
    port, epmd_port, dist_port = free_port(), free_port(), free_port()
    base = tempfile.mkdtemp(prefix="ca-rabbitmq-")
    with open(os.path.join(base, "enabled_plugins"), "w") as f:
        f.write("[].\n")
    open(os.path.join(base, "rabbitmq-env.conf"), "w").close()
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": base,  # the Erlang cookie
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": f"catest{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": os.path.join(base, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(base, "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(base, "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": os.path.join(base, "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": os.path.join(base, "rabbitmq"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": os.path.join(base, "plugins-expand"),
        # one scheduler, none spinning while idle: small and quiet on a loaded 2-core machine
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none",
    }
    log = open(os.path.join(base, "server.log"), "wb")  # noqa: SIM115 - the children own it
    epmd = cg.spawn(cid, ["epmd", "-port", str(epmd_port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    server = cg.spawn(cid, ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=env, stdout=log, stderr=subprocess.STDOUT,
                      cwd=base)
    log.close()
    try:
        try:
            wait_port("127.0.0.1", port, timeout=120, proc=server)
        except RuntimeError:
            with open(os.path.join(base, "server.log"), errors="replace") as f:
                raise RuntimeError(f"rabbitmq-server did not start:\n{f.read()[-4000:]}") from None
        yield port, cid
    finally:
        server.send_signal(signal.SIGTERM)  # the script stops the broker and waits for it
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            pass
        epmd.terminate()
        # what is left of the broker's processes (erl_child_setup, inet_gethost), by pid
        procs = os.path.join(cg.base, os.path.basename(cid), "cgroup.procs")
        with open(procs) as f:
            for pid in f.read().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        cg.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def wait_exit(p: subprocess.Popen, what: str) -> None:
    assert p.wait(60) == 0, f"{what} failed"


def test_published_and_consumed_messages_by_method(agent: AgentProcess, cgroups: TestCgroups,
                                                   broker: tuple[int, str]) -> None:
    port, broker_cid = broker
    url = f"amqp://guest:guest@127.0.0.1:{port}"
    queue = "orders"
    lib_cid, wire_cid, sub_cid = cgroups.create("amqp-publish"), cgroups.create("amqp-wire"), cgroups.create("amqp-sub")
    # the wire client declares the queue, then writes 5 single messages, 4 at once and 3 at once
    wire, published = start_client(cgroups, wire_cid, [*CLIENT, "publish", str(port), queue, "1", "1", "1", "1", "1",
                                                        "4", "3"], "RabbitMQ")
    assert published == {"published": 12}
    # librabbitmq: 9 messages, one per line, on one connection; it exits when done
    lib = cgroups.spawn(lib_cid, ["amqp-publish", "--url", url, "-r", queue, "-l"], stdin=subprocess.PIPE)
    assert lib.stdin is not None
    lib.stdin.write(b"".join(b"m%d\n" % i for i in range(9)))
    lib.stdin.close()
    wait_exit(lib, "amqp-publish")
    # all 21 waiting in the queue: the first delivery comes behind Consume-Ok, then one at a time
    sub = cgroups.spawn(sub_cid, ["amqp-consume", "--url", url, "-q", queue, "-c", "21", "-p", "1", "cat"],
                        stdout=subprocess.PIPE)
    out, _ = sub.communicate(timeout=60)
    assert sub.returncode == 0 and out.count(b"hello") == 12 and len(re.findall(rb"m\d", out)) == 9
    dest = f"127.0.0.1:{port}"
    wire_got = wait_methods(agent, FAMILY, 12, container_id=wire_cid, destination=dest)
    lib_got = wait_methods(agent, FAMILY, 9, container_id=lib_cid, destination=dest)
    sub_got = wait_methods(agent, FAMILY, 21, container_id=sub_cid, destination=dest)
    finish(wire)
    assert wire_got == {("produce", "ok"): 12}
    assert lib_got == {("produce", "ok"): 9}
    assert sub_got == {("consume", "ok"): 21}
    # no histogram, no other protocol, nothing for the broker's side, no spans
    assert_messages_only(agent, FAMILY, (lib_cid, wire_cid, sub_cid), broker_cid)
