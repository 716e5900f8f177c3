"""Build the guest driver (``guest/driver/``) against the built kernel's kbuild tree, with ``W=1``.

A module must be built against the very tree of the kernel it loads into, so the driver is built only for
the kernel ``aperture kernel build`` made (its object directory is recorded with it; the kernel build builds
the driver too) and only while that tree still holds that kernel's configuration. Results are cached under a
hash of the sources, the kernel's config and its release — a cached driver is used even when the tree is gone
(CI caches leave it out); a warning fails the build (the driver is held to ``W=1`` with no warnings).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from aperture.guest.errors import SetupError
from aperture.guest.kernelspec import KernelSpec

from .cache import cache_root, private_tmp

#: The module's name (``aperture_drv.ko``); its PCI driver is called ``aperture``.
DRIVER_MODULE = "aperture_drv"
#: The PCI driver name a device's ``driver_override`` names to be bound to it.
PCI_DRIVER = "aperture"


def driver_sources() -> list[Path]:
    """The module's sources, plus the generated device-ABI header it shares with the helper."""
    root = Path(str(resources.files("aperture.guest")))
    files = sorted(p for p in (root / "driver").iterdir() if p.suffix in (".c", ".h") or p.name == "Kbuild")
    return files + [root / "helper" / "aperture_abi.h"]


def driver_unavailable(kernel: KernelSpec) -> str | None:
    """Why this kernel gets no driver at all, or None (the built kernel and a kernel build tree do)."""
    if kernel.kind not in ("built", "tree") or kernel.config_file is None:
        return ("the aperture driver is built only against a kernel build tree: the kernel `aperture kernel "
                "build` makes, or --kernel DIR (your own tree)")
    return None


def _tree_problem(kernel: KernelSpec) -> str | None:
    """Why the driver cannot be built now (a cached one is still used)."""
    if kernel.build_dir is None or not (kernel.build_dir / ".config").is_file():
        return (f"the kernel's build tree {kernel.build_dir} is gone (caches may leave it out): run `aperture "
                "kernel build --force` to build the aperture driver")
    assert kernel.config_file is not None
    if (kernel.build_dir / ".config").read_bytes() != kernel.config_file.read_bytes():
        return (f"the build tree {kernel.build_dir} now holds another configuration than kernel "
                f"{kernel.release}'s: run `aperture kernel build --force` to build the aperture driver")
    return None


def driver_path(kernel: KernelSpec, cache: Path | None = None) -> Path:
    """Where the driver for ``kernel`` and today's sources is (or will be) cached."""
    assert kernel.config_file is not None
    digest = hashlib.sha256(kernel.release.encode() + b"\0" + kernel.config_file.read_bytes())
    for p in driver_sources():
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    return (cache or cache_root()) / "driver" / digest.hexdigest()[:16] / f"{DRIVER_MODULE}.ko"


def driver_missing(kernel: KernelSpec, cache: Path | None = None) -> str | None:
    """Why the image of ``kernel`` will carry no driver: none for this kernel, or not cached and no tree to
    build it in. None when it is cached or can be built."""
    why = driver_unavailable(kernel)
    if why is None and not driver_path(kernel, cache).exists():
        why = _tree_problem(kernel)
    return why


def build_driver(kernel: KernelSpec, cache: Path | None = None) -> Path:
    """``aperture_drv.ko`` for ``kernel``, built if not cached. SetupError says why it cannot be; a build with
    a warning or an error is a SetupError too (never a silently missing driver)."""
    why = driver_missing(kernel, cache)
    if why is not None:
        raise SetupError(why)
    out = driver_path(kernel, cache)
    if out.exists():
        return out
    assert kernel.build_dir is not None
    if shutil.which("make") is None:
        raise SetupError("make not found: it builds the guest driver (run scripts/setup.sh)")
    with tempfile.TemporaryDirectory(prefix="aperture-driver-") as tmp:
        work = Path(tmp)
        for p in driver_sources():
            shutil.copy2(p, work / p.name)
        proc = subprocess.run(["make", "-C", str(kernel.build_dir), f"M={work}", "W=1", "modules"],
                              capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        warnings = [line for line in output.splitlines() if "warning:" in line or "error:" in line]
        if proc.returncode != 0 or warnings:
            first = (warnings or output.strip().splitlines() or ["?"])[0]
            raise SetupError(f"building the guest driver failed (W=1, warnings are errors): {first.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = private_tmp(out)
        shutil.copy2(work / f"{DRIVER_MODULE}.ko", tmp_out)
        tmp_out.replace(out)
    return out
