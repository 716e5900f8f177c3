#!/usr/bin/env bash
# Set everything up (idempotent), then boot the default VM scenario and print its results.
# Extra arguments go to `aperture run` (e.g. --json, -v, --pmem 512M).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
exec "${APERTURE_VENV:-$repo/.venv}/bin/aperture" run "$@"
