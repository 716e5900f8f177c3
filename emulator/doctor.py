"""``aperture doctor``: what this machine has, in one report (also ``--json``)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guest.cache import cache_root, read_manifest
from guest.image import guest_binaries

from .errors import ApertureError

#: Kernel options the project's scenarios depend on, and why.
KERNEL_FLAGS = ("CONFIG_ZONE_DEVICE", "CONFIG_FS_DAX", "CONFIG_DEV_DAX", "CONFIG_LIBNVDIMM", "CONFIG_ACPI_NFIT",
                "CONFIG_BLK_DEV_PMEM", "CONFIG_PCI_P2PDMA", "CONFIG_DEVICE_PRIVATE", "CONFIG_HMM_MIRROR",
                "CONFIG_VIRTIO_CONSOLE", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_PVH", "CONFIG_EXT4_FS")


def qemu_object_props(qemu: str, typename: str) -> list[str]:
    out = subprocess.run([qemu, "-object", f"{typename},help"], capture_output=True, text=True, timeout=20)
    return [line.split("=", 1)[0].strip() for line in out.stdout.splitlines() if "=" in line]


def diagnose(probe: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    from .machine import find_qemu, qemu_version

    report: dict[str, dict[str, Any]] = {}
    qemu_section: dict[str, Any] = {}
    try:
        qemu = find_qemu()
        version = qemu_version(qemu)
        qemu_section = {"path": qemu, "version": version,
                        "memory-backend-file.offset": "offset" in qemu_object_props(qemu, "memory-backend-file")}
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
        "kernel": (manifest.get("kernel") or {}).get("release", "missing (run scripts/setup.sh)"),
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
        from guest.image import build_image
        from guest.kernel import resolve_kernel

        from .accel import choose_accel

        spec = resolve_kernel()
        image = build_image(spec)
        if progress:
            progress("probing KVM with a real boot")
        choice = choose_accel("auto", spec, image.path, qemu, version or "?", cache)
        accel["verdict"] = f"{choice.accel} ({choice.reason})"
    report["accelerator"] = accel

    kconf: dict[str, Any] = {}
    cfg = (manifest.get("kernel") or {}).get("config")
    if cfg and Path(cfg).exists():
        values: dict[str, str] = {}
        for line in Path(cfg).read_text(errors="replace").splitlines():
            if line.startswith("CONFIG_"):
                k, _, v = line.partition("=")
                values[k] = v
        kconf = {flag.removeprefix("CONFIG_"): values.get(flag, "not set") for flag in KERNEL_FLAGS}
    else:
        kconf = {"config": "no kernel config in the cache"}
    report["kernel config"] = kconf
    return report
