"""Benchmarks: figures with units in their names, ratios against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import KernelSpec, VmConfig
from .machine import Vm
from .run import prepare

Progress = Callable[[str], None]


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"{prefix}_p50": round(statistics.median(values), 3), f"{prefix}_min": round(min(values), 3),
            f"{prefix}_max": round(max(values), 3)}


def _boots(config: VmConfig, kernel: KernelSpec, initrd: Path, qemu: str, accel: str, n: int,
           progress: Progress, label: str) -> tuple[list[float], list[float]]:
    to_helper: list[float] = []
    to_off: list[float] = []
    for i in range(n):
        with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
            with Vm(config, kernel, initrd, accel=accel, run_dir=Path(tmp), scenario="probe", qemu=qemu) as vm:
                for _ in vm.messages():
                    pass
                off = vm.wait_poweroff()
                assert vm.boot_s is not None
                to_helper.append(vm.boot_s)
                to_off.append(off)
        progress(f"{label} boot {i + 1}/{n}: helper {to_helper[-1]:.2f} s, poweroff {to_off[-1]:.2f} s")
    return to_helper, to_off


def bench_boot(config: VmConfig, kernel: KernelSpec, n: int, progress: Progress) -> dict[str, Any]:
    prep = prepare(config, kernel, progress)
    helper, off = _boots(config, kernel, prep.image.path, prep.qemu, prep.accel.accel, n, progress, "bzImage")
    figures: dict[str, float] = {}
    figures.update(_stats("boot_to_helper_s", helper))
    figures.update(_stats("boot_to_poweroff_s", off))
    ratios: dict[str, float] = {}
    notes: list[str] = []

    from guest.pvh import extract_pvh_vmlinux

    vmlinux, why = extract_pvh_vmlinux(kernel)
    if vmlinux is not None:
        pvh_kernel = KernelSpec(vmlinux, kernel.modules_dir, kernel.release, kernel.config_file)
        ph, po = _boots(config, pvh_kernel, prep.image.path, prep.qemu, prep.accel.accel, n, progress, "PVH")
        figures.update(_stats("pvh_boot_to_helper_s", ph))
        figures.update(_stats("pvh_boot_to_poweroff_s", po))
        ratios["pvh_vs_bzimage_boot_to_helper"] = round(statistics.median(ph) / statistics.median(helper), 3)
    else:
        notes.append(f"PVH vmlinux not measured: {why}")
    ratios["helper_vs_poweroff"] = round(statistics.median(helper) / statistics.median(off), 3)
    return {"bench": "boot", "accel": prep.accel.accel, "qemu_version": prep.qemu_version,
            "kernel_release": kernel.release, "boots": n, "figures": figures, "ratios": ratios, "notes": notes}


def bench_dax(config: VmConfig, kernel: KernelSpec, progress: Progress) -> dict[str, Any]:
    """One boot of the ``bench-dax`` scenario: memcpy into RAM, devdax and fsdax, same boot."""
    from .errors import GuestError
    from .run import boot_once

    prep = prepare(config, kernel, progress)
    with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
        result = boot_once(config, prep, Path(tmp), progress, scenario="bench-dax",
                           guest_env={"aperture_stamp": "bench"})
    f = result.figures
    ram = f.get("memcpy_ram_MBps", 0.0)
    if ram <= 0:
        raise GuestError("the guest reported no memcpy figures")
    ratios = {}
    if f.get("memcpy_devdax_MBps"):
        ratios["devdax_vs_ram"] = round(f["memcpy_devdax_MBps"] / ram, 3)
    if f.get("memcpy_fsdax_MBps"):
        ratios["fsdax_vs_ram"] = round(f["memcpy_fsdax_MBps"] / ram, 3)
    return {"bench": "dax", "accel": prep.accel.accel, "qemu_version": prep.qemu_version,
            "kernel_release": kernel.release, "figures": f, "ratios": ratios,
            "notes": ["1 MiB memcpy repeated for 0.4 s per target, inside the guest"]}
