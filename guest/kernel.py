"""Resolve the guest kernel: the cached Debian package, a user bzImage, or a PVH-capable ELF vmlinux."""

from __future__ import annotations

import re
from pathlib import Path

from emulator.config import KernelSpec
from emulator.errors import ConfigError, SetupError

from .cache import read_manifest
from .elf import pvh_entry

_RELEASE_RE = re.compile(rb"Linux version (\S+)")


def kernel_format(path: Path) -> str:
    """``bzimage`` or ``pvh-elf``; anything else is a ConfigError."""
    with open(path, "rb") as f:
        head = f.read(0x210)
    if head[:4] == b"\x7fELF":
        if pvh_entry(path) is None:
            raise ConfigError(f"{path} is an ELF vmlinux without a PVH entry note (QEMU cannot boot it directly)")
        return "pvh-elf"
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return "bzimage"
    raise ConfigError(f"{path} is neither a bzImage nor an ELF vmlinux")


def kernel_release(path: Path) -> str:
    """The release string (``uname -r``) embedded in a bzImage header or an ELF vmlinux banner."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" and len(data) > 0x210:
        ptr = int.from_bytes(data[0x20E:0x210], "little")
        if ptr:
            start = ptr + 0x200
            text = data[start : start + 256].split(b"\0", 1)[0]
            if text:
                return text.split()[0].decode("ascii", "replace")
    m = _RELEASE_RE.search(data)
    if m:
        return m.group(1).decode("ascii", "replace")
    raise ConfigError(f"cannot find the kernel release string in {path}")


def _modules_for(release: str, modules: Path) -> Path:
    """Accept ``lib/modules/<rel>``, ``lib/modules`` or a root that contains ``lib/modules/<rel>``."""
    for cand in (modules, modules / release, modules / "lib/modules" / release):
        if (cand / "kernel").is_dir() or any(cand.glob("*.ko*")):
            return cand
    raise ConfigError(f"no modules for kernel {release} under {modules}")


def resolve_kernel(kernel: Path | None = None, modules: Path | None = None) -> KernelSpec:
    manifest = read_manifest().get("kernel")
    if kernel is None:
        if not manifest or not Path(manifest["image"]).exists():
            raise SetupError("no guest kernel in the cache: run scripts/setup.sh (or `aperture fetch`)")
        image = Path(manifest["image"])
        release = manifest["release"]
        mods = _modules_for(release, modules) if modules else Path(manifest["modules_dir"])
        config = Path(manifest["config"]) if Path(manifest["config"]).exists() else None
        return KernelSpec(image, mods, release, config)
    kernel = kernel.expanduser()
    if not kernel.is_file():
        raise ConfigError(f"kernel {kernel} does not exist")
    kernel_format(kernel)
    release = kernel_release(kernel)
    if modules is not None:
        mods = _modules_for(release, modules.expanduser())
    elif manifest and manifest["release"] == release:
        mods = Path(manifest["modules_dir"])
    else:
        candidates = [kernel.parent / "lib/modules" / release, kernel.parent.parent / "lib/modules" / release]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            raise SetupError(f"no modules found for kernel {release}: pass --modules DIR")
        mods = found
    config = next((c for c in (kernel.parent / f"config-{release}", kernel.parent / ".config") if c.exists()), None)
    return KernelSpec(kernel.resolve(), mods.resolve(), release, config)


def kernel_config(spec: KernelSpec) -> dict[str, str]:
    """``CONFIG_X`` → value from the kernel's config file (empty if unknown)."""
    if spec.config_file is None:
        return {}
    out: dict[str, str] = {}
    for line in spec.config_file.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out
