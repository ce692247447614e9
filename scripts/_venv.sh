# Sourced by the other scripts: make or reuse .venv and install msdata into it (editable)
# with the extras named in $MSDATA_EXTRAS. Re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.msdata-installed-${MSDATA_EXTRAS:-none}"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    spec="."
    [ -n "${MSDATA_EXTRAS:-}" ] && spec=".[${MSDATA_EXTRAS}]"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    echo "$want" > "$stamp"
fi
