#!/usr/bin/env bash
# Install what provisiond needs on a Debian machine: mosquitto (broker and
# clients) from apt when missing, and a virtualenv with the project in it.
# For the tests and benches also: RabbitMQ (the interop test starts its own
# throwaway node; its MQTT plugin ships with it) and a C compiler with
# libmosquitto-dev (the benches' C echo and load driver).
# And postgresql: the tests of that store start their own cluster.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_rr >/dev/null || missing+=(mosquitto-clients)
command -v systemd-analyze >/dev/null || missing+=(systemd)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
[ -f /usr/include/mosquitto.h ] || missing+=(libmosquitto-dev)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then missing+=(python3-venv); fi
# firmware/ (the C device library) and its tests: compiler, CMake, mbedTLS, libmosquitto.
command -v cc >/dev/null && command -v make >/dev/null || missing+=(build-essential)
command -v cmake >/dev/null || missing+=(cmake)
[ -f /usr/include/mbedtls/gcm.h ] || missing+=(libmbedtls-dev)
[ -f /usr/include/mosquitto.h ] || missing+=(libmosquitto-dev)
# The PostgreSQL store's tests start a throwaway cluster (initdb + pg_ctl).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.provisiond-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python packages into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
