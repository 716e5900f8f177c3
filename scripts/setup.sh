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
# apt's and dpkg's own output goes to a log; the terminal gets one line per step (and the log's tail on failure).
mkdir -p "$cache"
log="$cache/setup.log"
# One log across runs (a failed step stays readable after the next run), kept under ~1 MB.
[ "$(stat -c %s "$log" 2>/dev/null || echo 0)" -lt 1048576 ] || : >"$log"
printf '=== scripts/setup.sh, %s\n' "$(date)" >>"$log"
apt_get() {
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" >>"$log" 2>&1; then
        tail -8 "$log" | sed 's/^/    /' >&2
        say "apt-get $* failed (whole log: $log)"
        return 1
    fi
}
stamp="$cache/.apt-updated"
apt_update() {
    say "apt-get update"
    apt_get update && touch "$stamp"
}
if [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then apt_update || exit 1; fi

# QEMU: aperture needs 10.0 or newer (memory-backend-file's `offset`, used by hotplug remaps; the rest is probed
# at run time). Take the release's own QEMU when it is new enough (Debian 13: 10.0); only where it is too old
# (Debian 12: 7.2) add the release's backports suite and take QEMU from there. Versions are read without
# `| grep -q` on apt output: under pipefail, grep's early exit kills apt-cache with SIGPIPE and the test reads false.
. /etc/os-release
qemu_min=1:10.0
candidate() {  # candidate version of package $1 from suite $2 ("" = the release's own suites)
    apt-cache madison "$1" 2>/dev/null | awk -F'|' -v s="$2" -v own="${VERSION_CODENAME:-}" '
        { gsub(/ /, "", $2); split($3, a, " "); suite=a[2]; sub(/\/.*/, "", suite) }
        s != "" && suite == s && !v { v=$2 }
        s == "" && (suite == own || suite == own "-updates" || suite == own "-security") && !v { v=$2 }
        END { print v }'
}
stock_qemu=$(candidate qemu-system-x86 "")
backports=""
if [ -n "$stock_qemu" ] && dpkg --compare-versions "$stock_qemu" ge "$qemu_min"; then
    say "${PRETTY_NAME:-this release}: its own QEMU $stock_qemu is new enough (need $qemu_min+)"
elif [ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ]; then
    backports="${VERSION_CODENAME}-backports"
    if ! grep -rqs "^[^#]*$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        src=/etc/apt/sources.list.d/aperture-backports.sources
        # Use the mirror this machine's apt already uses for the main suite.
        mirror=$(awk -v suite="$VERSION_CODENAME" '
            /^URIs:/ {uri=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == suite) found=uri}
            /^deb / && $3 == suite && !found {found=$2}
            END {print found}' $(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null))
        mirror=${mirror:-http://deb.debian.org/debian}
        say "${PRETTY_NAME:-this release}'s QEMU is ${stock_qemu:-missing} (need $qemu_min+): adding $backports ($src)"
        printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" "$backports" | $sudo tee "$src" >/dev/null
        apt_update || exit 1
    else
        say "${PRETTY_NAME:-this release}'s QEMU is ${stock_qemu:-missing} (need $qemu_min+): taking it from $backports"
    fi
fi

host_pkgs=(qemu-system-x86 gcc libc6-dev e2fsprogs ndctl cpio zstd python3 python3-venv gdb)
# Building the guest kernel (aperture kernel build): kbuild's own tools; ccache makes rebuilds take seconds.
host_pkgs+=(make flex bison bc libelf-dev xz-utils ccache rsync)
missing=()
for p in "${host_pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
want_qemu=""
if [ -n "$backports" ]; then
    bpo_qemu=$(candidate qemu-system-x86 "$backports")
    have_qemu=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
    if [ -z "$bpo_qemu" ]; then
        say "no qemu-system-x86 in $backports; aperture needs QEMU $qemu_min+ (hotplug remaps will fail)"
    elif [ -z "$have_qemu" ] || dpkg --compare-versions "$have_qemu" lt "$bpo_qemu"; then
        want_qemu="qemu-system-x86/$backports"
        missing=("${missing[@]/qemu-system-x86/}")
        say "QEMU $bpo_qemu from $backports${have_qemu:+ (replacing $have_qemu)}"
    fi
fi
read -r -a missing <<<"${missing[*]}"
if [ -n "$want_qemu" ]; then
    # QEMU and what it depends on from backports (-t: its dependencies follow it there).
    say "installing qemu-system-x86 from $backports (apt's output: $log)"
    apt_get install --no-install-recommends -t "$backports" qemu-system-x86 || exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing host packages: ${missing[*]} (apt's output: $log)"
    # If QEMU's libraries from backports leave a build dependency from the main suite unresolvable (libelf1t64
    # against libelf-dev, as backports' QEMU did on Debian 13), take those packages from QEMU's suite too, rather
    # than leaving a mix apt cannot resolve.
    if ! apt_get install --no-install-recommends "${missing[@]}" 2>/dev/null; then
        [ -n "$backports" ] || exit 1
        say "retrying them from $backports, the suite QEMU's libraries came from"
        apt_get install --no-install-recommends -t "$backports" "${missing[@]}" || exit 1
    fi
elif [ -z "$want_qemu" ]; then
    say "host packages present: ${host_pkgs[*]}"
fi
say "QEMU: $(qemu-system-x86_64 --version | head -1)"

# ---------------------------------------------------------------- python
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import aperture.emulator.frontend.cli' 2>/dev/null \
   || [ "$repo/pyproject.toml" -nt "$venv/.aperture-installed" ]; then
    say "installing aperture and its test extras into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test]"
    touch "$venv/.aperture-installed"
else
    say "aperture already installed in $venv"
fi

# ---------------------------------------------------------------- guest packages
# The guest kernel from the same suite as QEMU: Debian 12 takes backports' 6.12, Debian 13 its own 6.12.
APERTURE_CACHE="$cache" "$venv/bin/aperture" fetch ${backports:+--release "$backports"}
# The default guest kernel: built once (about 5 minutes on 2 cores), then taken from the cache.
APERTURE_CACHE="$cache" "$venv/bin/aperture" kernel build
say "done"
