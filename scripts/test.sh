#!/usr/bin/env bash
# The whole test suite: lint, format, types, then pytest. Tests that need a server skip
# without it, or fail when MSDATA_REQUIRE_SERVICES=1 (as .ci/run sets it).
MSDATA_EXTRAS="dev" source "$(dirname "$0")/_venv.sh"
.venv/bin/ruff check src tests bench examples
.venv/bin/ruff format --check src tests bench examples
.venv/bin/mypy --strict src
exec .venv/bin/python -m pytest "$@"
