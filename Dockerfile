# Minimal image: Debian's BCC, the agent in a --system-site-packages venv. Kernel headers come
# from the host (/lib/modules, /usr/src mounted read-only) or, failing that, the packaged ones
# the agent links itself. Capability-scoped deployment arrives with deploy/kubernetes/.
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3-bpfcc python3-venv python3-pip linux-headers-amd64 \
    && rm -rf /var/lib/apt/lists/*
COPY . /opt/coroot-agent/src
RUN /usr/bin/python3 -m venv --system-site-packages /opt/coroot-agent/venv \
    && /opt/coroot-agent/venv/bin/pip install --no-cache-dir /opt/coroot-agent/src \
    && ln -s /opt/coroot-agent/venv/bin/coroot-agent /usr/local/bin/coroot-agent
ENTRYPOINT ["coroot-agent"]
CMD ["run", "--listen", "0.0.0.0:8080"]
