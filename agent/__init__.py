"""coroot-agent: an eBPF node agent in the Coroot node agent's data model."""

__version__ = "0.1.0"


def module_command(module: str, *args: str) -> tuple[list[str], str]:
    """(argv, cwd) that run `python -m <module>` of this package, as the agent itself runs, from
    an installed package or a checkout: the helpers the agent starts (agent.net.nsopener,
    agent.ebpf.release)."""
    import os
    import sys

    return [sys.executable, "-m", module, *args], os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
