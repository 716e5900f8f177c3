#!/usr/bin/env bash
# Static checks: ruff, mypy (strict) and the layer contracts (import-linter). Part of scripts/test.sh.
# mypy and import-linter read packages from the filesystem, and the folders emulator/, guest/, qmp_client/ are
# installed as aperture.emulator, aperture.guest, aperture.qmp_client: both are given a tree of links that
# spells the installed names.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${APERTURE_VENV:-$repo/.venv}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/aperture"
for pkg in emulator guest qmp_client; do ln -s "$repo/$pkg" "$tree/aperture/$pkg"; done
cd "$repo"

"$venv/bin/ruff" check emulator guest qmp_client tests || exit 1
(cd "$tree" && MYPYPATH="$tree" "$venv/bin/mypy" --config-file "$repo/pyproject.toml" \
    -p aperture.emulator -p aperture.guest -p aperture.qmp_client) || exit 1
if ! PYTHONPATH="$tree" "$venv/bin/lint-imports" --no-cache --config "$repo/pyproject.toml" >"$tree/layers" 2>&1; then
    cat "$tree/layers" >&2
    exit 1
fi
echo "lint.sh: ruff, mypy (strict) and the layer contracts (emulator → qmp_client → guest) pass" >&2
