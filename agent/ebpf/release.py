"""The agent's probes, detached after it has exited.

Detaching a perf-event probe (a tracepoint, a uprobe, the CPU sampling event) waits in the kernel
for RCU grace periods, one probe after the other under the kernel's trace event lock (~70 ms a
tracepoint here, with no overlap when done side by side): ~2 s for the agent's ~40 probes, which
would be most of its 2-second stop. The detach happens when the last descriptor of a probe's
perf event is closed, so at its stop the agent hands the descriptors to this short-lived process
(`python -m agent.ebpf.release`, started with them inherited), closes its own copies (a count
drop, no wait) and exits; this process closes them, which detaches the probes, then removes the
uprobe definitions libbcc wrote to tracing/uprobe_events for them (BCC names them
`<event>_bcc_<agent pid>`; through the perf PMU there are none). Until then the programs still
run and write to maps no one reads, for a second or two.

It does nothing else: no BPF call, no network, no file but tracefs' uprobe_events. Its arguments
are the descriptors' numbers and the event names; it ignores a descriptor that is not open.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from agent.ebpf import tracefs

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.ebpf.release", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent-pid", type=int, required=True, help="the agent's pid (in libbcc's event names)")
    ap.add_argument("--fd", type=int, action="append", default=[], help="a probe's perf event descriptor")
    ap.add_argument("--uprobe-event", action="append", default=[], help="BCC's name of a uprobe event")
    args = ap.parse_args(argv)
    for fd in args.fd:
        try:
            os.close(fd)
        except OSError:
            pass
    left = {f"{ev}_bcc_{args.agent_pid}": 3 for ev in args.uprobe_event}
    while left:  # a name goes once removed, or after three refusals
        tracefs.remove_uprobe_events(left)
        if left:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
