"""``aperture doctor``: what this machine has, in one report (also ``--json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aperture.guest.cache import cache_root, read_manifest
from aperture.guest.errors import ApertureError
from aperture.guest.image import guest_binaries

#: Kernel options the project's scenarios depend on, and why.
KERNEL_FLAGS = ("CONFIG_ZONE_DEVICE", "CONFIG_FS_DAX", "CONFIG_DEV_DAX", "CONFIG_LIBNVDIMM", "CONFIG_ACPI_NFIT",
                "CONFIG_BLK_DEV_PMEM", "CONFIG_PCI_P2PDMA", "CONFIG_DEVICE_PRIVATE", "CONFIG_HMM_MIRROR",
                "CONFIG_VIRTIO_CONSOLE", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_PVH", "CONFIG_EXT4_FS",
                "CONFIG_TEST_HMM", "CONFIG_BLK_DEV_NVME", "CONFIG_IKCONFIG")


def diagnose(probe: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    from aperture.qmp_client.qemu import find_qemu, object_props, qemu_version

    report: dict[str, dict[str, Any]] = {}
    qemu_section: dict[str, Any] = {}
    try:
        qemu = find_qemu()
        version = qemu_version(qemu)
        qemu_section = {"path": qemu, "version": version,
                        "memory-backend-file.offset": "offset" in object_props(qemu, "memory-backend-file")}
    except ApertureError as exc:
        qemu, version = None, None
        qemu_section = {"error": exc.one_line()}
    report["qemu"] = qemu_section
    report["guest binaries"] = {name: str(path) for name, path in guest_binaries().items()}

    cache = cache_root()
    manifest = read_manifest()
    images = sorted((cache / "images").glob("*.cpio")) if (cache / "images").is_dir() else []
    report["cache"] = {
        "dir": str(cache),
        "busybox": manifest.get("busybox", "missing (run scripts/setup.sh)"),
        "images": f"{len(images)} ({sum(p.stat().st_size for p in images) / 1e6:.1f} MB)",
    }

    accel: dict[str, Any] = {"/dev/kvm": "present and accessible" if os.access("/dev/kvm", os.R_OK | os.W_OK)
                             else "missing or not accessible"}
    verdicts_file = cache / "accel-verdicts.json"
    try:
        verdicts = json.loads(verdicts_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        verdicts = {}
    accel["kvm verdicts"] = {k: ("works" if v["ok"] else "unusable") for k, v in verdicts.items()} or "not probed"
    if probe and qemu and manifest.get("kernel"):
        from aperture.emulator.vm.accel import choose_accel
        from aperture.guest.image import build_image
        from aperture.guest.kernel import resolve_kernel

        spec = resolve_kernel()
        image = build_image(spec)
        if progress:
            progress("probing KVM with a real boot")
        choice = choose_accel("auto", spec, image.path, qemu, version or "?", cache)
        accel["verdict"] = f"{choice.accel} ({choice.reason})"
    report["accelerator"] = accel

    report.update(kernels_report())
    from aperture.emulator.vm.snapshots import list_snapshots, snapshots_dir

    snaps = list_snapshots()
    report["snapshots"] = {"dir": str(snapshots_dir()), "count": len(snaps),
                           "usable": sum(1 for sn in snaps if sn["ok"]),
                           "allocated_bytes": sum(sn["allocated_bytes"] for sn in snaps)}
    return report


def _flags(config: Path | None) -> dict[str, str] | str:
    if config is None or not config.exists():
        return "no kernel config known"
    from aperture.guest.kbuild import parse_config

    values = parse_config(config.read_text(errors="replace"))
    return {flag.removeprefix("CONFIG_"): values.get(flag, "not set") for flag in KERNEL_FLAGS}


def kernels_report() -> dict[str, dict[str, Any]]:
    """Both guest kernels: the built one (the default) and Debian's prebuilt one, with their config flags."""
    from aperture.guest.kbuild import cached_builds, current_build, fragment_path

    out: dict[str, dict[str, Any]] = {}
    built: dict[str, Any] = {}
    try:
        current = current_build()
    except ApertureError as exc:
        current = None
        built["error"] = exc.one_line()
    if current is None:
        built["status"] = "not built: run scripts/setup.sh (or `aperture kernel build`)"
    else:
        built.update({"status": "ready (default; --kernel built)", "release": current.release,
                      "vmlinux": str(current.vmlinux), "source": f"linux-source {current.source_version}",
                      "fragment": f"{fragment_path()} ({current.fragment_hash})", "compiler": current.compiler,
                      "build_s": current.build_s, "hmm-tests": str(current.hmm_tests or "not built"),
                      "build modules against": (f"make -C {current.obj_dir} M=$PWD  (then aperture run --module "
                                                "./x.ko)") if current.obj_dir else "its tree is not in the cache",
                      "config flags": _flags(current.config)})
    others = [b for b in cached_builds() if current is None or b.key != current.key]
    if others:
        built["other cached builds"] = [f"{b.release} ({b.key}, fragment {b.fragment_hash})" for b in others]
    out["kernel: built"] = built

    manifest = read_manifest().get("kernel") or {}
    debian: dict[str, Any] = {}
    if manifest:
        debian.update({"status": "cached (--kernel debian)", "release": manifest.get("release"),
                       "package": manifest.get("package"), "image": manifest.get("image"),
                       "config flags": _flags(Path(manifest["config"]) if manifest.get("config") else None)})
    else:
        debian["status"] = "not fetched: run scripts/setup.sh (or `aperture fetch`)"
    out["kernel: debian"] = debian
    return out
