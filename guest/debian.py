"""Fetch Debian guest packages (kernel image, busybox-static) into the cache, never installing them.

``apt-get download --print-uris`` names the file, its size and hash; we download it ourselves so that a
~100 MB kernel shows progress, verify the hash, and unpack it with ``dpkg-deb -x``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aperture.guest.errors import SetupError

from .cache import cache_root, read_manifest, write_manifest

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DebFile:
    package: str
    url: str
    filename: str
    size: int
    sha256: str | None


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise SetupError(f"{argv[0]} not found: guest packages are fetched with Debian's apt tools")
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise SetupError(f"{' '.join(argv)} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


def kernel_package(release: str | None) -> str:
    """The versioned kernel image package behind ``linux-image-amd64`` (from ``release`` if it has it)."""
    for spec in ([f"linux-image-amd64/{release}"] if release else []) + ["linux-image-amd64"]:
        try:
            out = _run(["apt-cache", "show", spec])
        except SetupError:
            continue
        m = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,(]*)", out, re.MULTILINE)
        if m:
            return m.group(1)
    raise SetupError("cannot find linux-image-amd64 in apt's lists (run scripts/setup.sh, or apt-get update)")


def resolve_uri(package: str) -> DebFile:
    out = _run(["apt-get", "download", "--print-uris", package])
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("'"):
            sha = None
            if len(parts) >= 4 and parts[3].upper().startswith("SHA256:"):
                sha = parts[3].split(":", 1)[1]
            return DebFile(package, parts[0].strip("'"), parts[1], int(parts[2]), sha)
    raise SetupError(f"apt-get download --print-uris {package} printed no URI")


def download(deb: DebFile, dest: Path, progress: Progress) -> None:
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    done = 0
    last_pct = -10
    try:
        with urllib.request.urlopen(deb.url, timeout=60) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                pct = done * 100 // max(deb.size, 1)
                if pct >= last_pct + 10 or done == deb.size:
                    progress(f"  {deb.filename}: {done >> 20}/{deb.size >> 20} MiB ({pct}%)")
                    last_pct = pct
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        # Fall back to apt itself (proxies, mirrors configured only for apt).
        progress(f"  direct download failed ({exc}); trying apt-get download")
        subprocess.run(["apt-get", "download", "-q", deb.package], cwd=dest.parent, check=False)
        if not dest.exists():
            raise SetupError(f"could not download {deb.package}: {exc}") from exc
        return
    if deb.sha256 and digest.hexdigest() != deb.sha256:
        tmp.unlink(missing_ok=True)
        raise SetupError(f"{deb.filename}: SHA256 mismatch after download")
    tmp.replace(dest)


def fetch_package(package: str, progress: Progress, parts: tuple[str, ...] = ()) -> Path:
    """Download ``package`` (and ``parts``, packages unpacked into the same tree) and unpack it; returns the
    unpack directory. Idempotent: a tree is complete only once every part is unpacked."""
    root = cache_root()
    debs = [resolve_uri(p) for p in (package, *parts)]
    unpack = root / "guest" / debs[0].filename.removesuffix(".deb")
    if (unpack / ".complete").exists():
        progress(f"{package}: cached ({unpack})")
        return unpack
    (root / "debs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir(parents=True)
    for deb in debs:
        dest = root / "debs" / deb.filename
        if not dest.exists() or dest.stat().st_size != deb.size:
            progress(f"{deb.package}: downloading {deb.size / 1e6:.0f} MB")
            download(deb, dest, progress)
        progress(f"{deb.package}: unpacking into {unpack}")
        _run(["dpkg-deb", "-x", str(dest), str(unpack)])
    (unpack / ".complete").touch()
    return unpack


#: From Linux 6.19 on, Debian's ``linux-image-<rel>`` is a metapackage; the kernel is in ``linux-binary-<rel>``,
#: the modules in ``linux-modules-<rel>``, the config and modules.builtin in ``linux-base-<rel>``.
_SPLIT_PART_RE = re.compile(r"\b(linux-(?:binary|modules|base)-[0-9][^\s,(|]*)")


def kernel_parts(package: str) -> tuple[str, ...]:
    """The packages that hold a split kernel's files (empty for a kernel packaged whole, as up to 6.18)."""
    out = _run(["apt-cache", "show", package])
    depends = next((ln for ln in out.splitlines() if ln.startswith("Depends:")), "")
    return tuple(dict.fromkeys(_SPLIT_PART_RE.findall(depends)))


@dataclass(frozen=True)
class UnpackedKernel:
    """Where a Debian kernel's files are in an unpacked tree: ``/boot`` + ``/lib/modules`` (up to Debian 12),
    merged /usr (``usr/lib/modules``, Debian 13), or everything under the modules directory (6.19 and later)."""

    image: Path
    release: str
    modules_dir: Path
    config: Path


def locate_kernel(tree: Path) -> UnpackedKernel | None:
    for moddir_root in (tree / "usr/lib/modules", tree / "lib/modules"):
        for moddir in sorted(moddir_root.glob("*")) if moddir_root.is_dir() else []:
            rel = moddir.name
            image = next((p for p in (tree / "boot" / f"vmlinuz-{rel}", moddir / "vmlinuz") if p.is_file()), None)
            if image is None:
                continue
            config = next((p for p in (tree / "boot" / f"config-{rel}", moddir / "config") if p.is_file()),
                          tree / "boot" / f"config-{rel}")
            return UnpackedKernel(image, rel, moddir, config)
    return None


def fetch_guest_packages(release: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Fetch the default kernel and busybox; record them in the cache manifest."""
    say = progress or (lambda s: print(s, file=sys.stderr))
    kpkg = kernel_package(release)
    kdir = fetch_package(kpkg, say, kernel_parts(kpkg))
    found = locate_kernel(kdir)
    if found is None:
        raise SetupError(f"{kpkg} unpacked into {kdir} holds no kernel image with its modules directory "
                         "(looked for boot/vmlinuz-REL and usr/lib/modules/REL/vmlinuz)")
    bdir = fetch_package("busybox-static", say)
    busybox = next((p for p in (bdir / "bin/busybox", bdir / "usr/bin/busybox") if p.exists()), None)
    if busybox is None:
        raise SetupError("busybox-static has no bin/busybox or usr/bin/busybox")
    manifest = read_manifest()
    manifest["kernel"] = {
        "package": kpkg,
        "image": str(found.image),
        "release": found.release,
        "modules_dir": str(found.modules_dir),
        "config": str(found.config),
    }
    manifest["busybox"] = str(busybox)
    write_manifest(manifest)
    return manifest
