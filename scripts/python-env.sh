#!/usr/bin/env bash
# Makes (once) the Python environment the API tests use: a venv with the
# exact packages of tests/python/requirements.txt (firecracker-python, a
# client written for Firecracker, and schemathesis, which generates
# requests from an OpenAPI spec). Prints the venv's python on stdout.
# The venv lives in $MOAT_CACHE (default ~/.cache/moat), named by the
# requirements' hash, so a change of pins makes a new one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req=$root/tests/python/requirements.txt
cache=${MOAT_CACHE:-$HOME/.cache/moat}
venv=$cache/venv-$(sha256sum "$req" | cut -c1-16)
if [[ ! -x $venv/bin/python || ! -e $venv/.complete ]]; then
    echo "python-env: creating $venv" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    # Debian's python3 (python3-venv, from install-deps.sh), whatever else
    # is first on PATH.
    /usr/bin/python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
