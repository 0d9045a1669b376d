#!/usr/bin/env bash
# One command: install what is missing, start a private mosquitto, create a
# demo organisation, user and API key, and run the daemon in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
