"""coroot-agent: an eBPF node agent in the Coroot node agent's data model."""

__version__ = "0.1.0"
