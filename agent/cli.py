"""Command line: `coroot-agent [run]`, `check`, `--version`. Parses, configures logging, and
hands over to the module that does the work. Exit codes: 0 ok, 1 runtime failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys

from agent import __version__, config

COMMANDS = ("run", "check", "query", "flamegraph")

DESCRIPTION = """\
eBPF node agent: sees every process on this host through eBPF (process lifecycle, TCP, L7
requests, CPU stacks) plus cgroups and logs, and exposes them in the Coroot node agent's data
model. Needs root (or CAP_BPF + CAP_PERFMON) and kernel headers; `coroot-agent check` says
what is missing.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coroot-agent", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Commands: run (the default), check, query, flamegraph. `coroot-agent COMMAND --help` lists the options.",
    )
    p.add_argument("--version", action="version", version=f"coroot-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (the default)",
                         description="Run the agent in the foreground. SIGTERM/SIGINT detach the "
                         "probes, flush what is buffered and exit 0.")
    config.add_arguments(run)

    check = sub.add_parser("check", help="preflight: can the agent run here?",
                           description="Check the kernel, BTF, tracefs, headers, capabilities, "
                           "cgroups, event buffers and that each probe family loads. Exits 0 "
                           "only when the agent can run; each failure says how to fix it.")
    check.add_argument("--no-probe", action="store_true", help="skip compiling and loading the probes")
    config.add_arguments(check)

    query = sub.add_parser(
        "query", help="read-only SQL against the store",
        description="Run one read of the agent's data (SELECT, SHOW, DESCRIBE, EXPLAIN, WITH, EXISTS; "
        "ClickHouse's parser decides, and it runs read-only with time and size limits) against the "
        "configured store: through the running agent's unix socket (root, or api_socket_group) "
        "while it holds the embedded store, otherwise directly. Tables: otel_traces, otel_logs, "
        "profiling_samples, profiling_stacks, metrics, ...",
        epilog='example: coroot-agent query "SELECT ServiceName, count() FROM otel_traces GROUP BY 1"',
    )
    query.add_argument("sql", metavar="SQL", help="the statement")
    query.add_argument("--format", choices=("tsv", "json"), default="tsv",
                       help="tsv: tab-separated with a header line (default); json: one JSON object per row, one per line")
    config.add_arguments(query)

    fg = sub.add_parser(
        "flamegraph", help="write a CPU flame graph from the stored profiles",
        description="Read the eBPF CPU profiles from the store (through the running agent while "
        "it holds the embedded store) and write a self-contained SVG flame graph, or folded "
        "stacks for other viewers.",
        epilog="example: coroot-agent flamegraph --service /system.slice/nginx.service --since 1h -o nginx.svg",
    )
    fg.add_argument("--service", help="the service (app_id), e.g. /system.slice/nginx.service; default: all, one root per service")
    fg.add_argument("--since", default="15m", help="how far back, e.g. 15m, 1h, 2d (default 15m)")
    fg.add_argument("--format", choices=("svg", "folded"), default="svg", help="svg (default) or folded stacks")
    fg.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")
    config.add_arguments(fg)
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    ns = _parser().parse_args(argv)
    try:
        cfg = config.from_namespace(ns)
    except config.ConfigError as e:
        print(f"coroot-agent: config error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level if ns.command not in ("query", "flamegraph") else "warning")
    if ns.command == "check":
        return _check(cfg, probe=not ns.no_probe)
    if ns.command == "query":
        return _query(cfg, ns.sql, ns.format)
    if ns.command == "flamegraph":
        return _flamegraph(cfg, ns)
    return _run(cfg)


def _flamegraph(cfg: config.Config, ns: argparse.Namespace) -> int:
    from agent.profiling import flamegraph
    from agent.query import QueryRefused
    from agent.sinks.store import StoreError

    try:
        profile = flamegraph.load(cfg, ns.service, ns.since)
    except ValueError as e:
        print(f"coroot-agent flamegraph: --since: {e}", file=sys.stderr)
        return 2
    except (StoreError, QueryRefused) as e:
        print(f"coroot-agent flamegraph: {e}", file=sys.stderr)
        return 1
    if not profile:
        what = f"service {ns.service}" if ns.service else "any service"
        print(f"coroot-agent flamegraph: no CPU samples for {what} in the last {ns.since}", file=sys.stderr)
        return 1
    text = flamegraph.folded(profile) if ns.format == "folded" else flamegraph.svg(
        profile, f"CPU: {ns.service or 'all services'}, last {ns.since}")
    if ns.output == "-":
        sys.stdout.write(text)
    else:
        with open(ns.output, "w") as f:
            f.write(text)
    return 0


def _query(cfg: config.Config, sql: str, fmt: str) -> int:
    from agent.query import QueryRefused, run
    from agent.sinks.store import StoreError

    try:
        run(cfg, sql, fmt, sys.stdout.buffer)
    except QueryRefused as e:
        print(f"coroot-agent query: refused: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"coroot-agent query: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    return 0


def _check(cfg: config.Config, probe: bool) -> int:
    from agent.check import FAIL, render, run_checks

    rows = run_checks(cfg, probe=probe)
    print(render(rows))
    return 1 if any(r.status == FAIL for r in rows) else 0


def _run(cfg: config.Config) -> int:
    from agent.run import Agent

    agent = Agent(cfg)
    # `kill -USR2 <pid>` prints every thread's stack to stderr: for "why is it stuck?"
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    try:
        agent.start()
    except Exception as e:  # noqa: BLE001 - start-up failures end with a message, not a trace
        logging.getLogger("agent").error("cannot start: %s", e)
        logging.getLogger("agent").debug("start-up failure", exc_info=True)
        agent.stop()
        return 1
    agent.wait()
    agent.stop()
    # Everything is flushed and closed: exit now rather than wait for the interpreter's teardown
    # (the embedded engine's native destructors and module cleanup took ~0.5-1.5 s on a loaded
    # machine), so a SIGTERM ends the process within the stop deadline.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
