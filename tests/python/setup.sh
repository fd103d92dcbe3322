#!/usr/bin/env bash
# Creates the virtual environment for the Python client tests (tests/python) at
# target/py-venv and installs tests/python/requirements.txt into it. Idempotent: does nothing
# when the venv exists and was made from the current requirements file (a copy of it is kept
# in the venv as the stamp); otherwise (re)creates it. Needs python3 with the venv module
# (Debian: apt-get install python3-venv).
#
#   tests/python/setup.sh          make or refresh target/py-venv
#   PY_VENV=/some/dir tests/python/setup.sh   another location
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
req="$root/tests/python/requirements.txt"
venv="${PY_VENV:-$root/target/py-venv}"
stamp="$venv/.requirements.txt"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
    exit 0
fi

python="${PYTHON:-python3}"
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "tests/python/setup.sh: $python lacks the venv/ensurepip modules (Debian: apt-get install python3-venv)" >&2
    exit 1
fi
echo "tests/python/setup.sh: creating $venv" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
cp "$req" "$stamp"
