#!/usr/bin/env bash
# Runs the e-commerce system (Order, Payment, Inventory) on the embedded default: one
# process, three SQLite files in a temp directory, the in-memory broker; no server.
# Arguments go to the load driver (--orders N, --concurrency N, --seed N, --no-refunds).
MSDATA_EXTRAS="examples" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m examples.ecommerce "$@"
