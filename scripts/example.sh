#!/usr/bin/env bash
# Runs the main example on the embedded default (SQLite + in-memory transport), no server.
MSDATA_EXTRAS="" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python examples/checkout.py "$@"
