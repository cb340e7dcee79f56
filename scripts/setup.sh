#!/usr/bin/env bash
# Installs what coroot-agent needs on a Debian machine, idempotently; seconds when nothing is
# missing. `scripts/setup.sh` for running the agent, `scripts/setup.sh --test` adds what the
# test suite needs. Must run as root (it installs Debian packages).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${COROOT_AGENT_VENV:-/opt/coroot-agent/venv}"
WANT_TEST=0
[ "${1:-}" = "--test" ] && WANT_TEST=1

say() { echo "setup: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "must run as root (it installs Debian packages and BPF needs root): sudo make ..."
    exit 1
fi

# --- Debian packages -------------------------------------------------------------------
pkgs=(python3-bpfcc python3-venv python3-pip)
if [ "$WANT_TEST" = 1 ]; then
    # gcc alone compiles nothing on a bare Debian: libc6-dev has the C headers and crt files.
    pkgs+=(gcc libc6-dev iproute2 procps curl openssl prometheus nftables ethtool
           nginx-light postgresql redis-server dnsmasq-base wrk hey python3-psycopg python3-redis
           debootstrap mariadb-server)
    pkgs+=(libssl-dev)  # libssl.a: the static OpenSSL TLS test links its client against it
    pkgs+=(binutils bpftool)  # unwind tables checked against readelf; the native-unwind test reads a BPF map
    # The heavier servers, runtimes and toolchains of single test modules (~1 GB installed).
    # COROOT_AGENT_SETUP_SERVERS=0 leaves them out (the bare-Debian bootstrap test does, to
    # stay within its time; those modules then fail, naming the package to install).
    if [ "${COROOT_AGENT_SETUP_SERVERS:-1}" != 0 ]; then
        # the L7 protocol tests' servers and clients (tests/system/test_l7_*.py)
        pkgs+=(memcached nats-server rabbitmq-server amqp-tools zookeeperd clickhouse-server)
        # container runtimes the runtime tests start themselves, each with its own root and socket
        pkgs+=(containerd docker.io podman)
        pkgs+=(default-jdk-headless)  # the JVM tests compile and run Java programs
        pkgs+=(golang-go)  # the Go TLS tests build their client and server with Debian's Go
        pkgs+=(golang-google-grpc-dev)  # grpc-go for the gRPC-over-TLS test (GOPATH build, test_l7_grpc_tls.py)
        pkgs+=(dbus-daemon)  # a real D-Bus peer for the systemd client's wire format (test_systemd_dbus.py)
        pkgs+=(nodejs)  # the Node.js event-loop test runs a script under Debian's node
        pkgs+=(rustc)  # the rustls finder's unit test compiles a stand-in crate
        # the rustls test's client and server: built offline with Debian's cargo against Debian's crates
        pkgs+=(cargo librust-rustls-dev librust-rustls-pemfile-dev)
    fi
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# Kernel headers: the running kernel's, built in, or any installed Debian linux-headers-*
# (the agent links the closest one itself; see agent/ebpf/headers.py).
rel="$(uname -r)"
have_headers=0
if [ -d "/lib/modules/$rel/build/include" ] || [ -e /sys/kernel/kheaders.tar.xz ] \
    || compgen -G "/usr/src/linux-headers-*-common" >/dev/null; then
    have_headers=1
fi

if [ "${#missing[@]}" -gt 0 ] || [ "$have_headers" = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    if [ "$have_headers" = 0 ]; then
        if apt-cache show "linux-headers-$rel" >/dev/null 2>&1; then
            missing+=("linux-headers-$rel")
        else
            missing+=("linux-headers-$(dpkg --print-architecture)")
            say "no linux-headers-$rel package: installing the distribution's current headers;" \
                "the agent will use the closest version"
        fi
    fi
    say "installing ${missing[*]}"
    # The test servers (nginx, postgresql, redis, mariadb) must not start as system services: the tests
    # run their own. Without a policy-rc.d, one is in place for the install only.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# --- virtualenv (Debian's python, so that `import bcc` works) ------------------------------
if ! "$VENV/bin/python" -c "import bcc" >/dev/null 2>&1; then
    say "creating virtualenv $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi

extras=""
[ "$WANT_TEST" = 1 ] && extras="[test,bench]"  # bench: py-spy for bench/l7_stages.py
stamp="$VENV/.coroot-agent-installed"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) $REPO $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing coroot-agent$extras into $VENV"
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO$extras" >/tmp/coroot-agent-pip.log 2>&1; then
        cat /tmp/coroot-agent-pip.log >&2; exit 1
    fi
    echo "$want" > "$stamp"
fi

ln -sf "$VENV/bin/coroot-agent" /usr/local/bin/coroot-agent
say "ready: $(coroot-agent --version)"
