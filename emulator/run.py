"""Orchestrate one run: image → accelerator → VM → helper messages → verified checks → ``RunResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guest.cache import cache_root
from guest.image import GuestImage, build_image

from .accel import AccelChoice, choose_accel
from .config import KernelSpec, VmConfig
from .errors import GuestError
from .machine import Vm, find_qemu, qemu_version
from .results import Check, RunResult, verify_nvdimm

Progress = Callable[[str], None]


def default_run_dir(name: str) -> Path:
    import os

    base = Path(os.environ.get("APERTURE_RUNS", "/tmp/aperture-runs"))
    return base / name


@dataclass(frozen=True)
class Prepared:
    """What a run needs before a VM starts; shared by run, bench and tests."""

    kernel: KernelSpec
    image: GuestImage
    qemu: str
    qemu_version: str
    accel: AccelChoice


def prepare(config: VmConfig, kernel: KernelSpec, progress: Progress) -> Prepared:
    qemu = find_qemu()
    version = qemu_version(qemu)
    progress(f"guest image: building for kernel {kernel.release}")
    image = build_image(kernel)
    progress(f"guest image: {image.path.name} ({'cached' if image.cached else 'built'}, "
             f"{len(image.modules)} modules)")
    accel = choose_accel(config.accel, kernel, image.path, qemu, version, cache_root())
    progress(f"accelerator: {accel.accel} ({accel.reason})")
    return Prepared(kernel, image, qemu, version, accel)


def run_vm(config: VmConfig, prep: Prepared, run_dir: Path, progress: Progress, *, scenario: str = "default",
           console_sink: Callable[[str], None] | None = None, name: str | None = None) -> RunResult:
    """Boot once, collect the helper's checks, verify them on the host against QMP."""
    checks: list[Check] = []
    notes: list[str] = []
    with Vm(config, prep.kernel, prep.image.path, accel=prep.accel.accel, run_dir=run_dir, scenario=scenario,
            qemu=prep.qemu, console_sink=console_sink, name=name) as vm:
        assert vm.qmp is not None
        progress(f"booting {vm.name} (QEMU {prep.qemu_version}, {prep.accel.accel}) in {vm.paths.run_dir}")
        qemu_ver = vm.qmp.version()
        devices = vm.qmp.memory_devices()
        for msg in vm.messages():
            kind = msg.get("type")
            if kind == "hello":
                progress(f"guest up: helper started {vm.boot_s:.2f} s after QEMU start "
                         f"(guest uptime {msg.get('uptime_s')} s)")
                if msg.get("kernel_release") != prep.kernel.release:
                    notes.append(f"guest reports kernel {msg.get('kernel_release')}")
            elif kind == "check":
                name_ = str(msg.get("name", "?"))
                check = Check(name_, bool(msg.get("ok")), msg.get("detail"))
                if name_ == "nvdimm.present":
                    check = verify_nvdimm(check, devices)
                checks.append(check)
                progress(f"  {'ok  ' if check.ok else 'FAIL'} {name_}")
            elif kind == "log":
                notes.append(str(msg.get("message")))
            elif kind == "garbage":
                notes.append(f"unparseable result line: {msg.get('raw')}")
        poweroff_s = vm.wait_poweroff()
        progress(f"guest powered off {poweroff_s:.2f} s after QEMU start")
        if not checks:
            raise GuestError("the guest helper reported no checks")
        return RunResult(
            ok=all(c.ok for c in checks),
            accel=prep.accel.accel,
            accel_reason=prep.accel.reason,
            qemu_version=qemu_ver,
            kernel_release=prep.kernel.release,
            boot_s=round(vm.boot_s, 3) if vm.boot_s is not None else None,
            poweroff_s=round(poweroff_s, 3),
            run_dir=str(vm.paths.run_dir),
            checks=checks,
            messages=notes,
        )
