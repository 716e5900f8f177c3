#!/usr/bin/env bash
# Run every benchmark (after setup) and print one JSON object: {"boot": {...}, "dax": {...}, ...}.
# Each bench reports figures (units in their names) and ratios against baselines measured in the same run.
#   scripts/bench.sh [boot dax device remap]     (default: all)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh" >&2
aperture="${APERTURE_VENV:-$repo/.venv}/bin/aperture"
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(boot dax device remap)
printf '{'
sep=""
for b in "${benches[@]}"; do
    printf '%s"%s": ' "$sep" "$b"
    "$aperture" bench "$b" --json
    sep=", "
done
printf '}\n'
