# coroot-agent image: Debian's BCC, the agent in a --system-site-packages virtualenv.
#
# Kernel headers: the host's, when /lib/modules and /usr/src are mounted read-only (the
# DaemonSet does); otherwise the packaged linux-headers-amd64 installed here, which the agent
# links as the closest version (see README.md, "Kernel headers").
# Privileges: run it with the capabilities of deploy/kubernetes/daemonset.yaml (agent/caps.py),
# not --privileged, on kernels 5.8+:
#   docker run --pid host --cap-drop ALL --cap-add BPF --cap-add PERFMON --cap-add SYS_PTRACE \
#     --cap-add DAC_READ_SEARCH --cap-add SYSLOG --cap-add SYS_RESOURCE \
#     -v /sys/kernel/tracing:/sys/kernel/tracing:ro -v /sys/fs/cgroup:/host/sys/fs/cgroup:ro \
#     -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro -v /var/log:/var/log:ro \
#     coroot-agent run --cgroupfs-root /host/sys/fs/cgroup
FROM debian:bookworm-slim

# Debian stable: packages take security updates in place, so versions are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3-bpfcc python3-venv python3-pip linux-headers-amd64 \
    && rm -rf /var/lib/apt/lists/*

# The programs in bpf/ are read at start-up from beside the package: an editable install from
# the source directory, as scripts/setup.sh does.
COPY pyproject.toml README.md /opt/coroot-agent/src/
COPY agent /opt/coroot-agent/src/agent
COPY bpf /opt/coroot-agent/src/bpf
RUN /usr/bin/python3 -m venv --system-site-packages /opt/coroot-agent/venv \
    && /opt/coroot-agent/venv/bin/pip install --no-cache-dir -e /opt/coroot-agent/src \
    && ln -s /opt/coroot-agent/venv/bin/coroot-agent /usr/local/bin/coroot-agent \
    && /usr/local/bin/coroot-agent --version

# Root's uid for file access (tracefs, /proc of other users); the capabilities come from the
# runtime (see above), and the agent drops what it no longer needs once its probes attach.
# hadolint ignore=DL3002
USER 0
EXPOSE 8080
ENTRYPOINT ["coroot-agent"]
CMD ["run", "--listen", "0.0.0.0:8080"]
