"""In-kernel cost of L7 detection on a connection that carries none of the agent's protocols:
a TCP ping-pong of bytes no detector recognises (tests/system/workloads/pingpong.py), client
and server on loopback in test cgroups, traced by a real agent. Every round trip is four
tracked calls (the client's write and read, the server's read and write), each tried against
every detector. Prints in-kernel ns per round trip (all the agent's programs, from
kernel.bpf_stats_enabled) and per tracked call. Run it from two checkouts to compare them (the
agent runs from the checkout the script is in). Asserts nothing: this machine is noisy.

Run as root: `python bench/l7_nomatch.py [--rounds 20000] [--connections 4] [--size 64] [--repeat 3]`
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.system.helpers import REPO, AgentProcess, TestCgroups, bpf_programs, free_port, wait_port  # noqa: E402

PINGPONG = [sys.executable, "-m", "tests.system.workloads.pingpong"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20000, help="round trips per connection")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="bytes per write")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cg = TestCgroups()
    agent: AgentProcess | None = None
    server = None
    try:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
        agent = AgentProcess(["--min-container-age", "0s"])
        agent.start()
        port = free_port()
        server = cg.spawn(cg.create("nomatch-server"), [*PINGPONG, "serve", str(port)], stdout=subprocess.DEVNULL,
                          cwd=REPO)
        wait_port("127.0.0.1", port, timeout=30, proc=server)
        cid = cg.create("nomatch-client")
        time.sleep(2)
        print(f"checkout {REPO}: {args.connections} connections x {args.rounds:,} round trips of {args.size} bytes")
        for _ in range(args.repeat):
            before = bpf_programs(agent.pid)
            p = cg.spawn(cid, [*PINGPONG, "client", str(port), str(args.connections), str(args.rounds),
                               str(args.size)], stdout=subprocess.PIPE, cwd=REPO)
            trips = int(p.communicate()[0].decode().strip() or 0)
            after = bpf_programs(agent.pid)
            ns = sum(v.get("run_time_ns", 0) - before.get(k, {}).get("run_time_ns", 0) for k, v in after.items())
            runs = sum(v.get("run_cnt", 0) - before.get(k, {}).get("run_cnt", 0) for k, v in after.items())
            print(f"  {trips:,} round trips: in-kernel {ns / trips:,.0f} ns per round trip, {ns / trips / 4:,.0f} ns "
                  f"per tracked call; {runs / trips:.1f} program runs per round trip")
        l7 = {lb.get("what", ""): v for n, lb, v in agent.metrics() if n == "coroot_agent_l7_kernel_total"}
        print(f"  the kernel's L7 accounting: {l7}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if agent is not None:
            agent.stop()
            shutil.rmtree(agent.storage, ignore_errors=True)
        cg.cleanup()
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)


if __name__ == "__main__":
    main()
