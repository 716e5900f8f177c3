#!/usr/bin/env bash
# Set everything up (idempotent), then run lint and the whole test suite (unit + real-VM integration).
# Extra arguments go to pytest (e.g. -m unit for the fast tests only).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh" || exit $?
venv=${APERTURE_VENV:-$repo/.venv}
cd "$repo"
"$venv/bin/ruff" check emulator guest qmp_client tests || exit 1
"$venv/bin/mypy" || exit 1  # the packages, as configured in pyproject.toml
# The layer contracts (pyproject.toml [tool.importlinter]). import-linter reads packages from the filesystem,
# and the editable install maps aperture.* through an import hook, so give it a real aperture/ tree of links.
layers=$(mktemp -d) && mkdir "$layers/aperture"
for pkg in emulator guest qmp_client; do ln -s "$repo/$pkg" "$layers/aperture/$pkg"; done
PYTHONPATH="$layers" "$venv/bin/lint-imports" --no-cache --config "$repo/pyproject.toml" >"$layers/out" 2>&1
lint_rc=$?
if [ "$lint_rc" -ne 0 ]; then cat "$layers/out" >&2; fi
rm -rf "$layers"
[ "$lint_rc" -eq 0 ] || exit 1
echo "test.sh: layer contracts kept (emulator → qmp_client → guest)" >&2
"$venv/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
