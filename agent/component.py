"""The shape every part of the running agent has: tracers, collectors and sinks are components
that `Agent` (agent/run.py) keeps in one list and drives in order.

Life cycle, each step called once per component in list order (`close` in reverse order):

- `attach(programs)`: the BPF programs are loaded; take the maps (through agent/ebpf/maps.py,
  never a BCC object) and attach probes. `programs` is None when the component needs none.
- `start()`: capabilities are dropped; start the component's own threads, if any.
- `on_process(what, proc)`: the registry saw a process "added" or "removed" (the poll thread, or
  the logs thread when it looks up a process whose exec event is still queued): short, no I/O,
  safe against the component's other threads. Subscribed by `Agent` after `attach`.
- `on_rename(old, new)`: the registry renamed a container from its cgroup-derived id to the
  id its runtime gave (the poll thread, right before `tick`): what was kept under `old` is kept
  under `new` from now on, added to what `new` has when another container held that id already.
  Nothing counted may be lost or counted twice. Subscribed by `Agent` with `on_process`.
- `tick(now, gone)`: housekeeping on the poll thread, about once a second; `gone` lists the
  containers the registry forgot since the last tick. Work that changes state belongs here.
- `collect(f)`: a scrape (the HTTP server's or the remote writer's thread) adds its series to
  `f`. It only reads: no kernel map writes, no conntrack, no state that a tick would change.
- `self_metrics(f)`: the component's own health series (`coroot_agent_*`), also read-only.
- `close()`: flush and release; safe to call twice. The probes are detached (all together, in
  the background) before the first `close`; the maps stay readable until the BPF component,
  first in the list, closes last.

Every method has a no-op default, so a component implements only what it does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.containers.registry import Process
    from agent.ebpf.maps import Programs
    from agent.metrics import Families


class Component:
    name: str = "component"

    def attach(self, programs: Programs | None) -> None:
        """Take maps and attach probes; the programs are loaded."""

    def start(self) -> None:
        """Start own threads; capabilities are already dropped."""

    def on_process(self, what: str, proc: Process) -> None:
        """A process was "added" to or "removed" from the registry."""

    def on_rename(self, old: str, new: str) -> None:
        """Container `old` is `new` from now on: re-key what is kept under `old`."""

    def tick(self, now: float, gone: list[str]) -> None:
        """Housekeeping on the poll thread; `gone`: containers forgotten since the last tick."""

    def collect(self, f: Families) -> None:
        """Add series for a scrape. Read-only."""

    def self_metrics(self, f: Families) -> None:
        """Add the component's own health series. Read-only."""

    def close(self) -> None:
        """Flush and release; safe to call twice."""
