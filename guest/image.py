"""Build the guest initramfs: busybox, the static helper, the module closure and /init, in one cpio.

Images are cached under a hash of every input, so an unchanged configuration is never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aperture.guest.errors import SetupError
from aperture.guest.kernelspec import KernelSpec

from .cache import cache_root, mtime_or_zero, private_tmp, read_manifest
from .cpio import CpioWriter
from .driver_build import DRIVER_MODULE, build_driver, driver_missing
from .elf import binary_closure, check_static_x86_64
from .kernel import kernel_config
from .kmod import ModuleIndex

#: Bump when the image layout changes, so cached images are rebuilt.
IMAGE_FORMAT = 4

#: The kernel's own HMM selftest, carried at /usr/lib/aperture/ when the kernel build made it.
HMM_TESTS = "hmm-tests"

@dataclass(frozen=True)
class GuestFeature:
    """What the guest needs from its kernel: a module name, the option that builds it, and why."""

    module: str
    option: str
    why: str
    required: bool = True
    at_boot: bool = True  # False: carried in the image, loaded by the check that needs it (boot stays short)


#: The NVDIMM stack in the order that works (dax core is built in), then what only some checks need.
GUEST_FEATURES: tuple[GuestFeature, ...] = (
    GuestFeature("libnvdimm", "CONFIG_LIBNVDIMM", "the NVDIMM bus"),
    GuestFeature("nfit", "CONFIG_ACPI_NFIT", "QEMU's NVDIMMs, described by the ACPI NFIT"),
    GuestFeature("nd_btt", "CONFIG_ND_BTT", "namespace sector mode (nd_pmem needs it)"),
    GuestFeature("nd_pmem", "CONFIG_BLK_DEV_PMEM", "/dev/pmemN, the fsdax namespace"),
    GuestFeature("dax_pmem", "CONFIG_DEV_DAX_PMEM", "devdax on an NVDIMM"),
    GuestFeature("device_dax", "CONFIG_DEV_DAX", "/dev/daxN.M"),
    GuestFeature("crc32c_generic", "CONFIG_CRYPTO_CRC32C", "ext4's metadata checksums"),
    GuestFeature("ext4", "CONFIG_EXT4_FS", "the fsdax filesystem"),
    GuestFeature("9pnet_virtio", "CONFIG_NET_9P_VIRTIO", "--share (host directories over 9p)", required=False),
    GuestFeature("9p", "CONFIG_9P_FS", "--share (host directories over 9p)", required=False),
    # test_hmm memremaps 256 MiB of device-private memory when it loads (~0.25 s under TCG): witness.c loads it.
    GuestFeature("test_hmm", "CONFIG_TEST_HMM", "witness.hmm_tests (the kernel's own HMM selftest)",
                 required=False, at_boot=False),
)


@dataclass(frozen=True)
class ModulePlan:
    """Which modules /init loads, and what was left out and why (for notes and doctor)."""

    load: tuple[str, ...]
    builtin: tuple[str, ...]
    absent: tuple[str, ...]  # optional features this kernel does not have
    on_demand: tuple[str, ...] = ()  # in the image, loaded by the check that needs them, not by /init


def plan_modules(kernel: KernelSpec, kconfig: dict[str, str],
                 features: tuple[GuestFeature, ...] = GUEST_FEATURES) -> ModulePlan:
    """A module is required only where the kernel really has it as a module (config ``=m``, or, with no
    config, not in ``modules.builtin``); a missing feature names the option to turn on."""
    load: list[str] = []
    builtin: list[str] = []
    absent: list[str] = []
    on_demand: list[str] = []
    index = ModuleIndex(kernel.modules_dir, kernel.release) if kernel.modules_dir else None
    for f in features:
        value = kconfig.get(f.option) if kconfig else None
        if value == "y" or (value is None and f.module in kernel.builtin):
            builtin.append(f.module)
            continue
        if kconfig and value != "m":
            if f.required:
                raise SetupError(f"kernel {kernel.release} lacks {f.option} ({f.why}): turn it on "
                                 "(=y, or =m with its modules directory)")
            absent.append(f.module)
            continue
        # =m, or no config and not built in: the module must be there.
        if index is None:
            if not f.required:
                absent.append(f.module)
                continue
            if kconfig:
                raise SetupError(f"kernel {kernel.release} has {f.option}=m ({f.why}): name its modules directory")
            raise SetupError(f"no modules found for kernel {kernel.release}: name its modules directory (a kernel with "
                             "everything built in needs its config: named, a .config beside it, or CONFIG_IKCONFIG)")
        if not f.required and f.module.replace("-", "_") not in index.paths:
            absent.append(f.module)
            continue
        (load if f.at_boot else on_demand).append(f.module)
    return ModulePlan(tuple(load), tuple(builtin), tuple(absent), tuple(on_demand))

#: Host binaries every image carries (with their shared-library closure): busybox has no mkfs.ext4.
DEFAULT_GUEST_BINS: tuple[str, ...] = ("mke2fs",)

#: Carried when the host has them (scripts/setup.sh installs ndctl): ndctl is the DAX checks' independent witness.
OPTIONAL_GUEST_BINS: tuple[str, ...] = ("ndctl",)


def _helper_dir() -> Path:
    return Path(str(resources.files("aperture.guest") / "helper"))


def _init_script() -> bytes:
    return (resources.files("aperture.guest") / "init.sh").read_bytes()


def build_helper(cache: Path | None = None) -> Path:
    """Compile the guest helper with ``gcc -static``; cached by a hash of the sources (the driver's UAPI header
    included: the helper's checks drive /dev/apertureN)."""
    uapi = _helper_dir().parent / "driver" / "aperture_uapi.h"
    src = sorted(p for p in _helper_dir().iterdir() if p.suffix in (".c", ".h")) + [uapi]
    digest = hashlib.sha256()
    for p in src:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    out_dir = (cache or cache_root()) / "helper" / digest.hexdigest()[:16]
    out = out_dir / "aperture-helper"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SetupError("gcc not found: it builds the static guest helper (run scripts/setup.sh)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(out)
    argv = [gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{uapi.parent}", "-o", str(tmp)]
    argv += [str(p) for p in src if p.suffix == ".c"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise SetupError(f"building the guest helper failed (is libc6-dev installed?): {tail}")
    check_static_x86_64(tmp)
    tmp.replace(out)
    _prune(out_dir.parent, "*/aperture-helper", keep=6)
    return out


@dataclass(frozen=True)
class GuestImage:
    path: Path
    digest: str
    kernel_release: str
    modules: tuple[str, ...]
    cached: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "digest": self.digest,
            "kernel_release": self.kernel_release,
            "modules": list(self.modules),
            "size": self.path.stat().st_size,
            "cached": self.cached,
        }


def _busybox() -> Path:
    path = read_manifest().get("busybox")
    if not path or not Path(path).exists():
        raise SetupError("busybox is not in the cache: run scripts/setup.sh (or `aperture fetch`)")
    bb = Path(path)
    check_static_x86_64(bb)
    return bb


def find_host_binary(name: str) -> Path:
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if Path(d, name).is_file():
            return Path(d, name)
    found = shutil.which(name)
    if found is None:
        raise SetupError(f"{name} not found on the host (scripts/setup.sh installs it)")
    return Path(found)


def guest_binaries() -> dict[str, str]:
    """What each default guest binary resolves to on this host, or why it will be missing (for doctor)."""
    out = {}
    for name in DEFAULT_GUEST_BINS + OPTIONAL_GUEST_BINS:
        try:
            out[name] = str(find_host_binary(name))
        except SetupError as exc:
            out[name] = exc.message + ("" if name in DEFAULT_GUEST_BINS else " — optional: the DAX checks run without "
                                       "their ndctl witness")
    return out


def optional_host_binaries() -> tuple[Path, ...]:
    found = []
    for name in OPTIONAL_GUEST_BINS:
        try:
            found.append(find_host_binary(name))
        except SetupError:
            pass
    return tuple(found)


def guest_files(bins: tuple[Path, ...]) -> dict[str, Path]:
    """Guest path → host file for each binary (in /usr/local/bin) and its loader and libraries."""
    files: dict[str, Path] = {}
    for b in bins:
        files[f"/usr/local/bin/{b.name}"] = b.resolve()
        files.update(binary_closure(b))
    return files


def build_image(kernel: KernelSpec, *, force: bool = False, cache: Path | None = None,
                guest_bins: tuple[Path, ...] = (), user_modules: tuple[Path, ...] = ()) -> GuestImage:
    root = cache or cache_root()
    bins = tuple(find_host_binary(n) for n in DEFAULT_GUEST_BINS) + optional_host_binaries() + tuple(guest_bins)
    extra = guest_files(bins)
    if kernel.hmm_tests is not None and kernel.hmm_tests.is_file():
        check_static_x86_64(kernel.hmm_tests)
        extra[f"/usr/lib/aperture/{HMM_TESTS}"] = kernel.hmm_tests
    plan = plan_modules(kernel, kernel_config(kernel))
    closure = []
    if plan.load or plan.on_demand:
        assert kernel.modules_dir is not None
        closure = ModuleIndex(kernel.modules_dir, kernel.release).closure(list(plan.load + plan.on_demand))
    # /init loads these, dependencies first; the rest of the closure waits for the check that needs it.
    at_boot = [m.name for m in closure if m.name not in plan.on_demand]
    # The guest driver, for the kernel it can be built against; /init loads it last (it binds no device until
    # a device's driver_override names it).
    driver = build_driver(kernel, root) if driver_missing(kernel, root) is None else None
    if driver is not None:
        at_boot.append(DRIVER_MODULE)
    # The user's own modules (--module): loaded last, in the order given, from lib/modules/user/.
    user = [(f"user/{p.stem}", p) for p in user_modules]
    at_boot += [name for name, _ in user]
    helper = build_helper(root)
    busybox = _busybox()
    init = _init_script()

    digest = hashlib.sha256()
    digest.update(json.dumps({"format": IMAGE_FORMAT, "release": kernel.release}).encode())
    for m in closure:
        st = m.path.stat()
        digest.update(f"{m.name}:{m.path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for blob in (helper.read_bytes(), busybox.read_bytes(), init):
        digest.update(hashlib.sha256(blob).digest())
    for guest_path, host in sorted(extra.items()):
        st = host.stat()
        digest.update(f"{guest_path}:{host}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    if driver is not None:
        digest.update(b"driver:" + hashlib.sha256(driver.read_bytes()).digest())
    for name, path in user:
        digest.update(name.encode() + b":" + hashlib.sha256(path.read_bytes()).digest())
    hexdigest = digest.hexdigest()[:20]
    out = root / "images" / f"initramfs-{hexdigest}.cpio"
    names = tuple(m.name for m in closure) + ((DRIVER_MODULE,) if driver is not None else ()) + \
        tuple(name for name, _ in user)
    if out.exists() and not force:
        return GuestImage(out, hexdigest, kernel.release, names, cached=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(out)
    with open(tmp, "wb") as f:
        w = CpioWriter(f)
        for d in ("bin", "sbin", "dev", "etc", "etc/aperture", "lib", "lib/modules", "lib/modules/user", "proc",
                  "sys", "run",
                  "tmp", "mnt", "usr", "usr/lib", "usr/lib/aperture"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", busybox.read_bytes(), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("bin/aperture-helper", helper.read_bytes(), 0o755)
        w.file("init", init, 0o755)
        for m in closure:
            w.file(f"lib/modules/{m.name}.ko", m.data)
        if driver is not None:
            w.file(f"lib/modules/{DRIVER_MODULE}.ko", driver.read_bytes())
        for name, path in user:
            w.file(f"lib/modules/{name}.ko", path.read_bytes())
        w.file("etc/aperture/modules", "".join(n + "\n" for n in at_boot).encode())
        for guest_path, host in sorted(extra.items()):
            w.file(guest_path, host.read_bytes(), 0o755)
        w.close()
    tmp.replace(out)
    _prune(out.parent, "initramfs-*.cpio", keep=6)
    return GuestImage(out, hexdigest, kernel.release, names, cached=False)


def _prune(base: Path, pattern: str, keep: int) -> None:
    """Images and helpers are cheap to rebuild: keep the newest few, so the cache does not grow with every change."""
    for path in sorted(base.glob(pattern), key=mtime_or_zero, reverse=True)[keep:]:
        path.unlink(missing_ok=True)
        if path.name == "aperture-helper":
            shutil.rmtree(path.parent, ignore_errors=True)
