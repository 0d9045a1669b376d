#!/usr/bin/env bash
# Set up if needed, then run the whole test suite against a real mosquitto.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k presence`, `--heavy`,
# `--store postgresql`: the store-touching tests on a throwaway PostgreSQL).
# With no arguments, the suites that exercise the broker connection (transport,
# RPC, presence, faults, signals) then run again on the aiomqtt backend.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$#" -eq 0 ] && { [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]; }; then
    echo "test.sh: the broker-facing suites again on the aiomqtt backend" >&2
    .venv/bin/python -m pytest --mqtt-client aiomqtt \
        tests/test_transport.py tests/test_rpc.py tests/test_presence.py \
        tests/test_faults.py tests/test_signals.py
    rc=$?
fi
set -e
# pytest exits 5 when it collected no test; an empty selection is not a failure of the code.
if [ "$rc" -eq 5 ]; then
    echo "no tests were collected" >&2
    exit 0
fi
exit "$rc"
