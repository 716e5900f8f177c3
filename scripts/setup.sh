#!/usr/bin/env bash
# Idempotent setup for aperture: host packages (apt), the project's virtualenv, and the guest package cache.
# Safe to re-run; every step says what it does and skips work that is already done.
#   scripts/setup.sh            everything
#   APERTURE_CACHE=DIR          where guest packages are cached (default: $XDG_CACHE_HOME/aperture)
#   APERTURE_VENV=DIR           the virtualenv (default: <repo>/.venv)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${APERTURE_VENV:-$repo/.venv}
cache=${APERTURE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aperture}
if [ -t 2 ]; then
    say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
else
    say() { printf '[setup] %s\n' "$*" >&2; }
fi

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

# ---------------------------------------------------------------- host packages
. /etc/os-release
backports=""
if [ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ]; then
    backports="${VERSION_CODENAME}-backports"
    src=/etc/apt/sources.list.d/aperture-backports.sources
    if ! grep -rqs "$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # Use the mirror this machine's apt already uses for the main suite.
        mirror=$(awk -v suite="$VERSION_CODENAME" '
            /^URIs:/ {uri=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == suite) found=uri}
            /^deb / && $3 == suite && !found {found=$2}
            END {print found}' $(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null))
        if [ -n "$mirror" ]; then
            say "adding the $backports apt source ($src, mirror $mirror)"
            printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$mirror" "$backports" | $sudo tee "$src" >/dev/null
            rm -f "$cache/.apt-updated"
        else
            say "no apt source for $VERSION_CODENAME found; using the distribution's QEMU and kernel"
        fi
    fi
fi

mkdir -p "$cache"
stamp="$cache/.apt-updated"
if [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
    say "apt-get update"
    $sudo apt-get update -qq
    touch "$stamp"
fi

host_pkgs=(qemu-system-x86 gcc libc6-dev e2fsprogs ndctl cpio zstd)
# Building the guest kernel (aperture kernel build): kbuild's own tools; ccache makes rebuilds take seconds.
host_pkgs+=(make flex bison bc libelf-dev xz-utils ccache rsync)
export DEBIAN_FRONTEND=noninteractive
# Backports has QEMU 10.x (memory-backend-file.offset, needed by hotplug remaps); stock bookworm has 7.2.
# Take it when it is newer than what is installed, including a stock QEMU installed earlier. (No `| grep -q`
# on apt output: under pipefail, grep's early exit kills apt-cache with SIGPIPE and the test reads false.)
bpo_qemu=""
if [ -n "$backports" ]; then
    bpo_qemu=$(apt-cache madison qemu-system-x86 2>/dev/null \
        | awk -F'|' -v s="$backports/" 'index($3, s) && !v {gsub(/ /, "", $2); v=$2} END {print v}')
    have_qemu=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
    if [ -n "$bpo_qemu" ] && { [ -z "$have_qemu" ] || dpkg --compare-versions "$have_qemu" lt "$bpo_qemu"; }; then
        say "installing qemu-system-x86 $bpo_qemu from $backports${have_qemu:+ (replacing $have_qemu)}"
        $sudo apt-get install -y -qq -t "$backports" --no-install-recommends qemu-system-x86
    fi
fi
missing=()
for p in "${host_pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing host packages: ${missing[*]}"
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    say "host packages present: ${host_pkgs[*]}"
fi
say "QEMU: $(qemu-system-x86_64 --version | head -1)"

# ---------------------------------------------------------------- python
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import aperture.emulator.cli' 2>/dev/null \
   || [ "$repo/pyproject.toml" -nt "$venv/.aperture-installed" ]; then
    say "installing aperture and its test extras into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test]"
    touch "$venv/.aperture-installed"
else
    say "aperture already installed in $venv"
fi

# ---------------------------------------------------------------- guest packages
APERTURE_CACHE="$cache" "$venv/bin/aperture" fetch ${backports:+--release "$backports"}
# The default guest kernel: built once (about 5 minutes on 2 cores), then taken from the cache.
APERTURE_CACHE="$cache" "$venv/bin/aperture" kernel build
say "done"
