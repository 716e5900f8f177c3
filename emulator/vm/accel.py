"""Pick the accelerator: KVM only when a real probe boot works (``/dev/kvm`` can exist and still fail), else TCG.

The verdict is cached per (QEMU version, host kernel, guest kernel) so the probe costs one boot, once.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aperture.emulator.config import PmemConfig, VmConfig
from aperture.guest.abi import MsgType
from aperture.guest.errors import ApertureError, SetupError
from aperture.guest.kernelspec import KernelSpec


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def _verdict_file(cache: Path) -> Path:
    return cache / "accel-verdicts.json"


#: A guest that has printed nothing on its console this long after QEMU started is not running under KVM (on a
#: nested host QEMU 11 can spin instead of failing; a working KVM guest prints its first line in well under 1 s).
FIRST_CONSOLE_S = 5.0


def probe_kvm(kernel: KernelSpec, initrd: Path, qemu: str, timeout: float = 30.0,
              first_console_s: float = FIRST_CONSOLE_S) -> tuple[bool, str]:
    """Boot the helper's ``probe`` scenario under KVM; True only if the guest says hello and done. The kernel
    logs at ``loglevel=7`` so that a silent console after ``first_console_s`` is a "no" in seconds."""
    from aperture.emulator.vm.machine import Vm, VmBoot

    config = VmConfig(pmem=(PmemConfig(),), accel="kvm", boot_timeout=timeout, run_timeout=timeout,
                      kernel_cmdline_extra=("loglevel=7",))
    silent = False

    def console_silent() -> bool:
        nonlocal silent
        silent = (not vm.console.seen_output() and time.monotonic() - vm.started_at > first_console_s)
        return silent

    with tempfile.TemporaryDirectory(prefix="aperture-kvm-probe-") as tmp:
        try:
            with Vm(config, VmBoot(kernel, initrd, qemu, "kvm"), run_dir=Path(tmp), scenario="probe") as vm:
                for msg in vm.messages(should_stop=console_silent):
                    if msg.get("type") == MsgType.DONE:
                        return True, "probe boot under KVM succeeded"
        except ApertureError as exc:
            return False, f"probe boot under KVM failed: {exc.one_line()[:160]}"
    if silent:
        return False, f"probe boot under KVM printed nothing on the console in {first_console_s:.0f} s"
    return False, "probe boot under KVM produced no result"


def choose_accel(requested: str, kernel: KernelSpec, initrd: Path, qemu: str, qemu_ver: str,
                 cache: Path) -> AccelChoice:
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if not usable:
        if requested == "kvm":
            raise SetupError("KVM was asked for, but /dev/kvm is missing or not accessible")
        return AccelChoice("tcg", "no usable /dev/kvm")
    key = f"{qemu_ver}|{platform.release()}|{kernel.release}"
    path = _verdict_file(cache)
    try:
        verdicts = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        verdicts = {}
    if key in verdicts:
        ok, reason = verdicts[key]["ok"], verdicts[key]["reason"] + " (cached)"
    else:
        ok, reason = probe_kvm(kernel, initrd, qemu)
        verdicts[key] = {"ok": ok, "reason": reason}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(verdicts, indent=2))
    if ok:
        return AccelChoice("kvm", reason)
    if requested == "kvm":
        raise SetupError(f"KVM was asked for, but {reason}")
    return AccelChoice("tcg", f"KVM unusable: {reason}")
