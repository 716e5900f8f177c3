"""Resolve the guest kernel: the built kernel (default), Debian's prebuilt one, or a user's bzImage/vmlinux.

A user's kernel may carry everything built in: its config (``--config``, a ``.config``/``config-<release>``
next to it, or the kernel's own IKCONFIG) and ``modules.builtin`` decide which modules are really needed, so
a monolithic kernel boots without ``--modules``.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from pathlib import Path

from aperture.guest.errors import ConfigError, SetupError
from aperture.guest.kernelspec import KernelSpec

from .cache import cache_root, private_tmp, read_manifest
from .elf import pvh_entry
from .kbuild import current_build, parse_config
from .kmod import read_builtin
from .pvh import bzimage_payload

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


def embedded_config(image: Path) -> str | None:
    """The config a kernel carries with CONFIG_IKCONFIG (between ``IKCFG_ST`` and ``IKCFG_ED``), or None."""
    data = image.read_bytes()
    if data[:4] != b"\x7fELF":
        payload, _ = bzimage_payload(data)
        if payload is None:
            return None
        data = payload
    start = data.find(b"IKCFG_ST")
    end = data.find(b"IKCFG_ED", start + 8) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    try:
        return gzip.decompress(data[start + 8 : end]).decode("utf-8", "replace")
    except (OSError, EOFError, zlib.error):
        return None


def _cached_embedded_config(image: Path) -> Path | None:
    """IKCONFIG extracted once into the cache (keyed by the image's identity), as a file KernelSpec can name."""
    st = image.stat()
    key = hashlib.sha256(f"{image.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "ikconfig" / f"{key}.config"
    if out.exists():
        return out
    text = embedded_config(image)
    if text is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(out)
    tmp.write_text(text)
    tmp.replace(out)
    return out


def _modules_for(release: str, modules: Path) -> Path:
    """Accept ``lib/modules/<rel>``, ``lib/modules`` or a root that contains ``lib/modules/<rel>`` (or, merged
    /usr, ``usr/lib/modules/<rel>``)."""
    if not modules.is_dir():
        raise ConfigError(f"modules directory {modules}: not a directory")
    for cand in (modules, modules / release, modules / "lib/modules" / release, modules / "usr/lib/modules" / release):
        if (cand / "kernel").is_dir() or (cand / "modules.builtin").is_file() or any(cand.glob("*.ko*")):
            return cand
    raise ConfigError(f"no modules for kernel {release} under {modules}")


def built_kernel(flavor: str = "default") -> KernelSpec:
    """The kernel ``aperture kernel build`` made from today's fragment: the default flavour through its PVH entry,
    the debug flavour as a bzImage (a KASAN kernel entered through PVH powered off before its first console line
    on these machines; why is not yet found)."""
    built = current_build(flavor=flavor)
    if built is None:
        if flavor != "default":
            raise SetupError(f"no {flavor} kernel in the cache: run `aperture kernel build --flavor {flavor}` "
                             "(about 15 minutes on 2 cores the first time)")
        raise SetupError("no built guest kernel for the current guest/kconfig/aperture.config in the cache: run "
                         "scripts/setup.sh (or `aperture kernel build`); `--kernel debian` boots Debian's kernel")
    image = built.vmlinux if flavor == "default" else built.bzimage
    return KernelSpec(image, built.modules_dir, built.release, built.config, "built",
                      read_builtin(built.modules_dir), built.hmm_tests, built.obj_dir)


def debian_kernel(modules: Path | None = None) -> KernelSpec:
    """Debian's prebuilt kernel from the cache (``aperture fetch``)."""
    manifest = read_manifest().get("kernel")
    if not manifest or not Path(manifest["image"]).exists():
        raise SetupError("Debian's guest kernel is not in the cache: run scripts/setup.sh (or `aperture fetch`)")
    release = manifest["release"]
    mods = _modules_for(release, modules) if modules else Path(manifest["modules_dir"])
    config = Path(manifest["config"]) if Path(manifest["config"]).exists() else None
    return KernelSpec(Path(manifest["image"]), mods, release, config, "debian", read_builtin(mods))


def resolve_kernel(kernel: Path | str | None = None, modules: Path | None = None,
                   config: Path | None = None) -> KernelSpec:
    """``None``/``"built"``: the built kernel; ``"debian"``: Debian's; otherwise a bzImage or PVH vmlinux."""
    if kernel is None or str(kernel) in ("built", "built-debug"):
        if modules is not None or config is not None:
            raise ConfigError("a modules directory and a config go with a kernel file (not 'built' or 'debian')")
        return built_kernel("debug" if str(kernel) == "built-debug" else "default")
    if str(kernel) == "debian":
        if config is not None:
            raise ConfigError("a config goes with a kernel file (not 'built' or 'debian')")
        return debian_kernel(modules)
    path = Path(kernel).expanduser()
    if path.is_dir():
        if modules is not None or config is not None:
            raise ConfigError("a kernel build tree brings its own modules and .config")
        from .tree import tree_kernel

        return tree_kernel(path)
    if not path.is_file():
        raise ConfigError(f"kernel {path}: no such file")
    kernel_format(path)
    release = kernel_release(path)
    manifest = read_manifest().get("kernel") or {}
    mods: Path | None
    if modules is not None:
        mods = _modules_for(release, modules.expanduser())
    elif manifest.get("release") == release:
        mods = Path(manifest["modules_dir"])
    else:
        candidates = [d / sub / release for d in (path.parent, path.parent.parent)
                      for sub in ("lib/modules", "usr/lib/modules")]
        mods = next((c for c in candidates if c.is_dir()), None)
    if config is not None:
        config = config.expanduser()
        if not config.is_file():
            raise ConfigError(f"kernel config {config}: no such file")
        config_file: Path | None = config
    else:
        config_file = next((c for c in (path.parent / f"config-{release}", path.parent / ".config") if c.is_file()),
                           None) or _cached_embedded_config(path)
    return KernelSpec(path.resolve(), mods.resolve() if mods else None, release,
                      config_file.resolve() if config_file else None, "user", read_builtin(mods))


def kernel_config(spec: KernelSpec) -> dict[str, str]:
    """``CONFIG_X`` → value from the kernel's config file (empty if unknown)."""
    if spec.config_file is None:
        return {}
    return parse_config(spec.config_file.read_text(errors="replace"))
