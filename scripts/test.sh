#!/usr/bin/env bash
# Set everything up (idempotent), then run lint and the whole test suite (unit + real-VM integration).
# Extra arguments go to pytest (e.g. -m unit for the fast tests only).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh" || exit $?
venv=${APERTURE_VENV:-$repo/.venv}
cd "$repo"
"$repo/scripts/lint.sh" || exit 1  # ruff, mypy --strict, the layer contracts
"$venv/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
