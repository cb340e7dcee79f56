#!/bin/sh
# The first command on a bare Debian (debootstrap --variant=minbase, nothing else installed):
# installs make, then runs `make <target>` in this checkout, which installs the rest
# (scripts/setup.sh). Needs only what minbase has: sh, apt-get, dpkg-query, coreutils.
#   scripts/bootstrap.sh run | test | check | unit ...   (extra arguments go to make, e.g. ARGS=...)
# Must run as root. Idempotent: when make is present it only runs make.
set -eu

REPO="$(cd "$(dirname "$0")/.." && pwd)"

if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: must run as root (it installs Debian packages): sudo $0 $*" >&2
    exit 1
fi
if [ "$#" = 0 ]; then
    echo "usage: $0 run|test|check|unit|lint [make arguments, e.g. ARGS=\"--listen 0.0.0.0:8080\"]" >&2
    exit 2
fi

if ! command -v make >/dev/null 2>&1; then
    echo "bootstrap: installing make" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends make >/dev/null
fi

exec make -C "$REPO" --no-print-directory "$@"
