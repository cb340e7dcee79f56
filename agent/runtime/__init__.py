"""Application runtimes seen without instrumenting them: the JVM's own performance counters
(hsperfdata) and, where probes are needed, the interpreter's lock waits. Not to be confused
with the container runtimes (Docker, containerd, CRI-O, Podman) in agent/containers/runtimes."""
