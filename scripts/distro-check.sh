#!/usr/bin/env bash
# Run the README's two commands on a fresh, minimal system of a Debian release, as a new user would.
#
#   scripts/distro-check.sh RELEASE [--clean]      RELEASE: bookworm (Debian 12) or trixie (Debian 13)
#
# Builds a minimal system of RELEASE with debootstrap into a scratch directory (once; reused while it is
# complete), puts a clean clone of this repository's HEAD in it, binds the host's /proc, /sys and /dev in (with a
# tmpfs of its own on /dev/shm, so the suite's "nothing left in /dev/shm" checks see only the chroot's files), and
# runs `scripts/run.sh` and then `scripts/test.sh` inside it with a plain root environment. The guest ccache is
# the host's (~/.cache/aperture/ccache), so a kernel built with the same compiler is not paid twice.
#   --clean                    start from a new debootstrap (the scratch system is otherwise kept for the next run)
#   APERTURE_DISTRO_DIR=DIR    scratch directory (default /var/tmp/aperture-distro)
#   APERTURE_DISTRO_MIRROR=URL Debian mirror (default: the one this host's apt uses, else deb.debian.org)
# Exit: 0 both commands passed; 1 one of them failed; 2 bad usage; 3 the scratch system could not be built.
# Logs: DIR/RELEASE-run.log, DIR/RELEASE-test.log; a summary line per command on stderr.
set -uo pipefail

usage() { sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; }
release=""
clean=0
for arg in "$@"; do
    case "$arg" in
        bookworm | trixie) release=$arg ;;
        --clean) clean=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "distro-check: unknown argument '$arg' (releases: bookworm, trixie)" >&2; exit 2 ;;
    esac
done
[ -n "$release" ] || { echo "distro-check: name a release: bookworm or trixie" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "distro-check: needs root (debootstrap, chroot, bind mounts)" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${APERTURE_DISTRO_DIR:-/var/tmp/aperture-distro}
root=$base/$release
host_ccache=${APERTURE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aperture}/ccache
say() { printf '[distro-check %s] %s\n' "$release" "$*" >&2; }
mirror=${APERTURE_DISTRO_MIRROR:-$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit} /^deb / && $2 ~ /debian\/?$/ {print $2; exit}' \
    /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null)}
mirror=${mirror:-http://deb.debian.org/debian}

mounted=()
cleanup() {
    # Processes left inside the chroot (a failed suite's QEMU) would keep the mounts busy: end them first.
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null
    done
    mounted=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if findmnt -rn -o TARGET | grep -q "^$root/"; then
    echo "distro-check: $root still has mounts (another distro-check running?); see findmnt" >&2
    exit 2
fi
if [ "$clean" = 1 ] && [ -d "$root" ]; then
    say "removing the old scratch system $root"
    rm -rf --one-file-system "$root"
fi

# ---------------------------------------------------------------- the scratch system
if [ ! -e "$root/.aperture-debootstrap-complete" ]; then
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap on this host (it builds the scratch system)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null || exit 3
    fi
    rm -rf --one-file-system "$root"
    mkdir -p "$base"
    say "debootstrap $release from $mirror into $root (a few minutes; log: $base/$release-debootstrap.log)"
    t0=$SECONDS
    if ! debootstrap --variant=minbase --include=ca-certificates,git "$release" "$root" "$mirror" \
            >"$base/$release-debootstrap.log" 2>&1; then
        tail -5 "$base/$release-debootstrap.log" >&2
        say "debootstrap failed"
        exit 3
    fi
    touch "$root/.aperture-debootstrap-complete"
    say "debootstrap took $((SECONDS - t0)) s"
fi
# What this host knows about its network, not about packages: resolvers, extra CAs (a TLS-intercepting proxy),
# pip's pointer at the system CA bundle, apt's tweaks (e.g. no Valid-Until checks).
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
for f in /etc/apt/apt.conf.d/*; do
    grep -qiE 'Acquire::(Check|http|https)' "$f" 2>/dev/null && cp "$f" "$root/etc/apt/apt.conf.d/"
done

# ---------------------------------------------------------------- a clean clone of HEAD
rm -rf --one-file-system "$root/root/aperture"
git clone -q --no-local "$repo" "$root/root/aperture" || exit 3
say "cloned $(git -C "$repo" rev-parse --short HEAD) into $root/root/aperture"

# ---------------------------------------------------------------- mounts
bind() {  # bind SRC DEST-inside-root
    mkdir -p "$root$2"
    mount --bind "$1" "$root$2" && mounted+=("$root$2")
}
bind /proc /proc
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
mount -t tmpfs -o size=8g,mode=1777 tmpfs "$root/dev/shm" && mounted+=("$root/dev/shm")
mkdir -p "$host_ccache"
bind "$host_ccache" /root/.cache/aperture/ccache

in_chroot() {
    chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 TERM="${TERM:-dumb}" ${CI:+CI=$CI} bash -c "cd /root/aperture && $1"
}

rc=0
for cmd in run test; do
    log=$base/$release-$cmd.log
    say "scripts/$cmd.sh (log: $log)"
    t0=$SECONDS
    in_chroot "scripts/$cmd.sh" >"$log" 2>&1 </dev/null
    status=$?
    took=$((SECONDS - t0))
    last=$(grep -E '^aperture run:|passed|failed|error' "$log" | tail -1)
    say "scripts/$cmd.sh: exit $status in ${took} s${last:+ — $last}"
    [ "$status" = 0 ] || rc=1
    if [ "$cmd" = run ] && [ "$status" = 0 ]; then
        log=$base/$release-run-debian.log
        t0=$SECONDS
        in_chroot ".venv/bin/aperture run --kernel debian" >"$log" 2>&1 </dev/null
        status=$?
        say "aperture run --kernel debian: exit $status in $((SECONDS - t0)) s — $(grep -E '^aperture run:' "$log" | tail -1)"
        [ "$status" = 0 ] || rc=1
    fi
done
if [ "$rc" = 0 ]; then
    say "PASS: $(. "$root/etc/os-release" && echo "$PRETTY_NAME")"
else
    say "FAIL: see the logs in $base"
fi
exit "$rc"
