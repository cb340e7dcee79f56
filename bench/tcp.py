"""Connect storm: short TCP connections at a target rate for a while, from a test cgroup, with
the agent running. Prints events lost (target 0), connects counted vs made, agent CPU µs per
connection, and in-kernel ns per program run (kernel.bpf_stats_enabled). Asserts nothing.

Run as root: `python bench/tcp.py [--rate 5000] [--seconds 10]`.

Burst: `python bench/tcp.py --burst 100000 [--listeners 200] [--refused 1000] [--stopped] [--repeat N]
[--agent-args="..."]`: as fast as one client can, in its own network namespace (tests/system/
workloads/tcp_burst.py), to LISTENERS loopback listeners plus refused connects; `--stopped`
keeps the agent stopped (SIGSTOP) through the burst, a descheduled agent on a busy node, so the
event buffer surely overflows. Prints connects made vs counted, events lost, the agent's RSS
before and after each burst.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import REPO, AgentProcess, TestCgroups, bpf_programs  # noqa: E402

CLIENT = """
import socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
n, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    s = socket.create_connection(("127.0.0.1", port))
    s.close()
    n += 1
    ahead = n / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
print(n, time.monotonic() - start, flush=True)
"""


def prog_stats(pid: int) -> dict[str, tuple[int, int]]:
    return {k: (v.get("run_time_ns", 0), v.get("run_cnt", 0)) for k, v in bpf_programs(pid).items()}


def burst(args: argparse.Namespace) -> None:
    cg = TestCgroups()
    agent = AgentProcess(["--min-container-age", "0s", *args.agent_args])
    agent.start()
    try:
        cid = cg.create("burst")
        proc = psutil.Process(agent.proc.pid)
        time.sleep(2)
        rss0 = proc.memory_info().rss
        print(f"agent RSS before: {rss0 / 2**20:.0f} MB")
        made_total = failed_total = 0
        for i in range(args.repeat):
            cpu0 = sum(proc.cpu_times()[:2])
            lost0 = agent.value("coroot_agent_lost_events_total", what="tcp_events") or 0
            argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-m",
                    "tests.system.workloads.tcp_burst", "127.0.0.1", str(args.listeners), str(args.burst),
                    str(min(10, args.refused) or 1), str(args.refused)]
            client = cg.spawn(cid, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
            ready = client.stdout.readline()
            assert ready.startswith("ready"), ready
            if args.stopped:
                agent.proc.send_signal(signal.SIGSTOP)
            try:
                client.stdin.write("go\n")
                client.stdin.flush()
                _, ok, failed, took = client.stdout.readline().split()
            finally:
                if args.stopped:
                    agent.proc.send_signal(signal.SIGCONT)
            client.stdin.write("exit\n")
            client.stdin.flush()
            client.wait()
            made, refused = int(ok), int(failed)
            made_total += made
            failed_total += refused

            def counted() -> tuple[float, float]:
                m = agent.metrics()
                good = sum(v for n, lb, v in m if n == "container_net_tcp_successful_connects_total"
                           and lb.get("container_id") == cid)
                bad = sum(v for n, lb, v in m if n == "container_net_tcp_failed_connects_total"
                          and lb.get("container_id") == cid)
                return good, bad

            deadline = time.monotonic() + 30
            while counted() != (made_total, failed_total) and time.monotonic() < deadline:
                time.sleep(0.5)
            good, bad = counted()
            time.sleep(3)
            rss = proc.memory_info().rss
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            lost = (agent.value("coroot_agent_lost_events_total", what="tcp_events") or 0) - lost0
            print(f"burst {i + 1}{' (agent stopped through it)' if args.stopped else ''}: {made} connections made in "
                  f"{float(took):.1f} s ({made / float(took):,.0f}/s) to {args.listeners} listeners, "
                  f"{refused} refused; tcp events lost: {lost:.0f}")
            print(f"  counted by the agent so far: {good:.0f} of {made_total} connects, {bad:.0f} of {failed_total} "
                  f"failed connects; agent RSS {rss / 2**20:.0f} MB; agent CPU {cpu * 1e6 / made:.1f} µs per connection")
    finally:
        agent.stop()
        cg.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--burst", type=int, default=0, help="connections of one burst (0: the rate mode)")
    ap.add_argument("--listeners", type=int, default=200)
    ap.add_argument("--refused", type=int, default=1000)
    ap.add_argument("--stopped", action="store_true", help="SIGSTOP the agent through the burst")
    ap.add_argument("--repeat", type=int, default=1, help="bursts, one after the other (memory across them)")
    ap.add_argument("--agent-args", type=str.split, default=[], help='more flags for the agent, one string: '
                    '--agent-args="--tcp-events-pages 1"')
    args = ap.parse_args()
    if args.burst:
        burst(args)
        return
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    port = srv.getsockname()[1]

    def accept() -> None:
        while True:
            c, _ = srv.accept()
            c.close()

    threading.Thread(target=accept, daemon=True).start()
    cg = TestCgroups()
    agent = AgentProcess(["--min-container-age", "0s"])
    agent.start()
    try:
        cid = cg.create("storm")
        proc = psutil.Process(agent.proc.pid)
        time.sleep(1)
        cpu0 = sum(proc.cpu_times()[:2])
        stats0 = prog_stats(agent.proc.pid)
        client = cg.spawn(cid, [sys.executable, "-c", CLIENT, str(port), str(args.rate), str(args.seconds)],
                          stdout=subprocess.PIPE)
        made, took = client.communicate()[0].split()
        made = int(made)
        time.sleep(3)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        stats1 = prog_stats(agent.proc.pid)
        series = [(lb, v) for n, lb, v in agent.metrics()
                  if n == "container_net_tcp_successful_connects_total" and lb.get("container_id") == cid]
        counted = sum(v for _, v in series)
        if len(series) != 1:
            print("series:", series)
        lost = sum(v for n, _, v in agent.metrics() if n == "coroot_agent_lost_events_total")
        missed = sum(v for n, _, v in agent.metrics() if n == "coroot_agent_bpf_missed_runs_total")
        ns = sum(stats1[k][0] - stats0.get(k, (0, 0))[0] for k in stats1)
        runs = sum(stats1[k][1] - stats0.get(k, (0, 0))[1] for k in stats1)
        print(f"connections made: {made} in {float(took):.1f} s ({made / float(took):,.0f}/s); counted by the agent: {counted:.0f}")
        print(f"events lost: {lost:.0f} (target 0); program runs skipped by the kernel: {missed:.0f}")
        print(f"agent CPU: {cpu * 1e6 / made:.1f} µs per connection ({cpu / float(took) * 100:.1f}% of one core)")
        print(f"in-kernel: {ns / max(runs, 1):.0f} ns per program run, {ns / made:.0f} ns per connection "
              f"({runs / made:.1f} runs per connection, all programs of the agent)")
    finally:
        agent.stop()
        cg.cleanup()
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)


if __name__ == "__main__":
    main()
