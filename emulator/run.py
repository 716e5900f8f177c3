"""Orchestrate one run: image → accelerator → VM → helper messages → verified checks → ``RunResult``."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aperture.guest import abi
from aperture.guest.abi import CheckName, Env, MsgType, Phase
from aperture.guest.cache import cache_root, mtime_or_zero
from aperture.guest.driver_build import DRIVER_MODULE
from aperture.guest.errors import ConfigError, GuestError, SetupError
from aperture.guest.image import GuestImage, build_image
from aperture.guest.kernel import kernel_config
from aperture.guest.kernelspec import KernelSpec
from aperture.qmp_client.qemu import NVME_ID, PROBE_BAR_ID, find_qemu, qemu_version
from aperture.qmp_client.remap import RemapController

from .accel import AccelChoice, choose_accel
from .config import RemapPlan, VmConfig
from .machine import Vm
from .processes import pid_alive
from .results import (
    Check,
    HostVerifier,
    RunResult,
    UntouchableFiles,
    driver_claims,
    emulator_thread_check,
    pinned_vs_remap,
    remap_consistency,
    remap_hotplug,
    verify_fuzz,
)
from .runpaths import AUTO_NAME, reap_dead_runs

Progress = Callable[[str], None]


#: A hostile guest cannot grow the host through the results channel: notes, garbage notes and records are bounded.
MAX_NOTES = 200
MAX_GARBAGE_NOTES = 20
MAX_RECORDS = 200_000


def check_helper_abi(hello: dict[str, Any]) -> None:
    """A helper that speaks another results-channel ABI than this host is refused (exit 3): its messages would be
    read wrong. (A stale image, or one built by another aperture.)"""
    got = hello.get("helper_abi")
    if got != abi.HELPER_ABI:
        raise SetupError(f"the guest helper speaks results ABI {got!r}, this host {abi.HELPER_ABI}: rebuild the "
                         "image (`aperture image build --force`) with this aperture")


def default_run_dir(name: str) -> Path:
    """``$APERTURE_RUNS/NAME`` (default /tmp/aperture-runs), after pruning old auto-named runs there."""
    base = Path(os.environ.get("APERTURE_RUNS", "/tmp/aperture-runs"))
    keep = os.environ.get("APERTURE_KEEP_RUNS", "10")
    if not keep.isdigit():
        raise ConfigError(f"APERTURE_KEEP_RUNS={keep!r}: expected a whole number of run directories to keep")
    prune_runs(base, int(keep))
    return base / name


def prune_runs(base: Path, keep: int) -> list[Path]:
    """An auto-named run directory holds ~0.5 GB of NVDIMM and device-memory files: keep the newest ``keep``.

    Named directories (``--run-dir``, ``aperture up NAME``) are never touched, nor one whose run is alive.
    """
    try:
        runs = [p for p in base.iterdir() if AUTO_NAME.fullmatch(p.name) and p.is_dir()]
    except OSError:
        return []
    runs.sort(key=mtime_or_zero, reverse=True)
    removed = []
    for path in runs[keep:]:
        match = AUTO_NAME.fullmatch(path.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@dataclass(frozen=True)
class BootInputs:
    """What a run needs before a VM starts; shared by run, bench and tests."""

    kernel: KernelSpec
    image: GuestImage
    qemu: str
    qemu_version: str
    accel: AccelChoice


def prepare(config: VmConfig, kernel: KernelSpec, progress: Progress) -> BootInputs:
    reaped = reap_dead_runs(Path(os.environ.get("APERTURE_SHM", "/dev/shm")))
    if reaped:
        progress(f"removed the shm files and sockets of {len(reaped)} run(s) whose process was killed")
    qemu = find_qemu()
    version = qemu_version(qemu)
    progress(f"guest image: building for kernel {kernel.release}")
    image = build_image(kernel, guest_bins=config.guest_bins)
    progress(f"guest image: {image.path.name} ({'cached' if image.cached else 'built'}, "
             f"{len(image.modules)} modules)")
    accel = choose_accel(config.accel, kernel, image.path, qemu, version, cache_root())
    progress(f"accelerator: {accel.accel} ({accel.reason})")
    return BootInputs(kernel, image, qemu, version, accel)


def phase_period(msg: dict[str, Any]) -> float:
    """The remap period a guest's ``remap_start`` asks for (``every_ms``, 1 ms to 1 s; 5 ms when it names none)."""
    every = msg.get("every_ms")
    ms = float(every) if isinstance(every, (int, float)) and not isinstance(every, bool) else 5.0
    return min(max(ms, 1.0), 1000.0) / 1e3


def _verifier(vm: Vm, config: VmConfig, kernel: KernelSpec, driver: bool) -> HostVerifier:
    assert vm.qmp is not None
    return HostVerifier(
        devices=vm.qmp.memory_devices(),
        pci=vm.qmp.pci_devices(),
        pmem_files=[vm.paths.pmem(i) for i in range(len(config.pmem))],
        pmem_modes=[p.mode for p in config.pmem],
        devmem_files=[vm.paths.devmem(i) for i in range(len(config.devices))],
        kconfig=kernel_config(kernel),
        memory=config.memory,
        probe_bar_id=PROBE_BAR_ID,
        nvme_file=vm.paths.nvme if config.nvme else None,
        nvme_id=NVME_ID,
        hmm_tests_in_image=kernel.hmm_tests is not None,
        driver_in_image=driver,
    )


def boot_once(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *, scenario: str = "default",
              console_sink: Callable[[str], None] | None = None, name: str | None = None,
              guest_env: dict[str, str] | None = None, remap: RemapPlan | None = None) -> RunResult:
    """Boot once, collect the helper's checks and figures, verify them on the host."""
    checks: list[Check] = []
    notes: list[str] = []
    figures: dict[str, float] = {}
    written: list[dict[str, Any]] = []
    stamps: list[Any] = []
    garbage = 0  # unparseable lines on the results channel: the first few become notes, all are counted
    controller: RemapController | None = None
    remap_stats = None
    untouchable = (UntouchableFiles.take(run_dir, [inputs.image.path, inputs.kernel.image]) if scenario == "fuzz"
                   else None)
    with Vm(config, inputs.kernel, inputs.image.path, accel=inputs.accel.accel, run_dir=run_dir, scenario=scenario,
            qemu=inputs.qemu, console_sink=console_sink, name=name, guest_env=guest_env) as vm:
        assert vm.qmp is not None
        progress(f"booting {vm.name} (QEMU {inputs.qemu_version}, {inputs.accel.accel}) in {vm.paths.run_dir}")
        qemu_ver = vm.qmp.version()
        verifier: HostVerifier | None = None
        pending: list[Check] = []
        for msg in vm.messages():
            kind = msg.get("type")
            if kind == MsgType.HELLO:
                check_helper_abi(msg)
                # BARs are assigned by the guest's firmware: read the address map once the guest is up.
                verifier = _verifier(vm, config, inputs.kernel, DRIVER_MODULE in inputs.image.modules)
                progress(f"guest up: helper started {vm.boot_s:.2f} s after QEMU start "
                         f"(guest uptime {msg.get('uptime_s')} s)")
                if msg.get("kernel_release") != inputs.kernel.release:
                    notes.append(f"guest reports kernel {msg.get('kernel_release')}")
            elif kind == MsgType.CHECK:
                check = Check.from_message(msg)
                if check is None:
                    garbage += 1
                    if garbage <= MAX_GARBAGE_NOTES:
                        notes.append(f"malformed check message ignored: {str(msg)[:160]}")
                else:
                    absent = isinstance(check.detail, dict) and check.detail.get("result") == "absent"
                    progress(f"  guest: {'ok  ' if check.ok else 'n/a ' if absent else 'FAIL'} {check.name}")
                    pending.append(check)
                    written.extend(driver_claims(check)[: max(MAX_RECORDS - len(written), 0)])
            elif kind == MsgType.FIGURES and isinstance(msg.get("values"), dict):
                figures.update({str(k): float(v) for k, v in msg["values"].items() if isinstance(v, (int, float))})
            elif (kind == MsgType.PHASE and msg.get("name") == Phase.REMAP_START and vm.service
                  and not controller):
                # The remap workload runs under the user's plan; a check that asks for remaps itself (the
                # driver's p2p.pinned_vs_remap) names its period.
                plan = remap or RemapPlan(every=phase_period(msg), duration=1.0, mode="pause")
                mode = os.environ.get("APERTURE_REMAP_MODE") or plan.mode  # "unsafe": negative control
                controller = RemapController(vm.qmp, vm.service.devices, plan.every, mode)
                controller.on_replug = vm.service.invalidate_map
                controller.start()
                progress(f"guest workload running; remapping every {plan.every * 1e3:g} ms ({plan.mode} mode)")
            elif kind == MsgType.PHASE and msg.get("name") == Phase.REMAP_END and controller:
                remap_stats = controller.stop()
                progress(f"{remap_stats.remaps} remaps done")
            elif kind == MsgType.STAMPS and isinstance(msg.get("stamps"), list):
                stamps.extend(msg["stamps"][: max(MAX_RECORDS - len(stamps), 0)])
            elif kind == MsgType.WRITTEN and isinstance(msg.get("regions"), list):
                written.extend(r for r in msg["regions"][: max(MAX_RECORDS - len(written), 0)] if isinstance(r, dict))
            elif kind == MsgType.LOG and len(notes) < MAX_NOTES:
                notes.append(str(msg.get("message"))[:500])
            elif kind == MsgType.GARBAGE:
                garbage += 1
                if garbage <= MAX_GARBAGE_NOTES:
                    notes.append(f"unparseable result line: {msg.get('raw')}")
        if garbage > MAX_GARBAGE_NOTES:
            notes.append(f"{garbage - MAX_GARBAGE_NOTES} more unparseable or malformed result lines ({garbage} in all)")
        poweroff_s = vm.wait_poweroff()
        progress(f"guest powered off {poweroff_s:.2f} s after QEMU start")
        device_stats = vm.service.stats() if vm.service else []
        thread_errors = (vm.service.loop_error_count, list(vm.service.loop_errors)) if vm.service else (0, [])
    # Verify after the VM is gone: the guest has flushed, QEMU has exited, window slots are written back.
    if controller and remap_stats is None:
        remap_stats = controller.stop()
    checks = [verifier.verify(c, written) for c in pending] if verifier else pending
    if scenario == "fuzz":
        checks = [verify_fuzz(c, untouchable, remap_stats) if c.name == CheckName.APERTURE_FUZZ else c for c in checks]
    elif remap is None:
        checks = [pinned_vs_remap(c, remap_stats) if c.name == CheckName.P2P_PINNED_VS_REMAP else c for c in checks]
    if remap is not None:
        checks = [remap_consistency(c, remap_stats) if c.name == CheckName.REMAP_CONSISTENCY else c for c in checks]
        if remap.mode == "hotplug":
            checks.append(remap_hotplug(next((c for c in checks if c.name == CheckName.REMAP_CONSISTENCY), None),
                                        remap_stats))
        if verifier:
            checks.append(verifier.verify_stamps(stamps, config.devices))
    if thread_errors[0]:
        checks.append(emulator_thread_check(*thread_errors, run_dir))
    if not checks and scenario == "default":
        raise GuestError("the guest helper reported no checks")
    return RunResult(
        ok=all(c.ok for c in checks),
        accel=inputs.accel.accel,
        accel_reason=inputs.accel.reason,
        qemu_version=qemu_ver,
        kernel_release=inputs.kernel.release,
        boot_s=round(vm.boot_s, 3) if vm.boot_s is not None else None,
        poweroff_s=round(poweroff_s, 3),
        run_dir=str(vm.paths.run_dir),
        checks=checks,
        messages=notes,
        figures=figures,
        run_name=vm.name,
        devices=device_stats,
    )


def run_vm(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *, reboot: bool = False,
           console_sink: Callable[[str], None] | None = None, name: str | None = None,
           remap: RemapPlan | None = None, fuzz: float | None = None) -> RunResult:
    """The default scenario; with ``reboot``, boot twice in the same run dir and check persistence;
    with ``remap``, the window workload under host-driven remaps instead."""
    token = secrets.token_hex(4)
    if fuzz is not None:
        return boot_once(config, inputs, run_dir, progress, scenario="fuzz", console_sink=console_sink, name=name,
                         guest_env={Env.STAMP: token, Env.DURATION: f"{fuzz:g}",
                                    Env.REMAP: "1" if remap else "0"}, remap=remap)
    if remap is not None:
        if remap.mode == "hotplug":
            config = dataclasses.replace(config, window_hotplug=True)
        return boot_once(config, inputs, run_dir, progress, scenario="remap", console_sink=console_sink, name=name,
                         guest_env={Env.STAMP: token, Env.DURATION: f"{remap.duration:g}",
                                    Env.REMAP_MODE: remap.mode},
                         remap=remap)
    first = boot_once(config, inputs, run_dir, progress, console_sink=console_sink, name=name,
                      guest_env={Env.STAMP: token})
    if not reboot:
        return first
    progress("rebooting to verify persistence")
    second = boot_once(config, inputs, run_dir, progress, console_sink=console_sink, name=name,
                       guest_env={Env.STAMP: secrets.token_hex(4), Env.EXPECT: token})
    return merge_boots([first, second])


def merge_boots(results: list[RunResult]) -> RunResult:
    """One result for several boots: a check is ok only if it was ok in every boot that reported it."""
    merged: dict[str, Check] = {}
    per_boot: dict[str, list[bool]] = {}
    for r in results:
        for c in r.checks:
            per_boot.setdefault(c.name, []).append(c.ok)
            prev = merged.get(c.name)
            merged[c.name] = c if prev is None or prev.ok or not c.ok else prev
    checks = []
    for name, c in merged.items():
        detail = dict(c.detail, ok_per_boot=per_boot[name]) if isinstance(c.detail, dict) else c.detail
        checks.append(Check(name, all(per_boot[name]), detail))
    last = results[-1]
    return RunResult(
        ok=all(c.ok for c in checks), accel=last.accel, accel_reason=last.accel_reason,
        qemu_version=last.qemu_version, kernel_release=last.kernel_release, boot_s=results[0].boot_s,
        poweroff_s=results[0].poweroff_s, run_dir=last.run_dir, checks=checks,
        messages=[m for r in results for m in r.messages], figures=last.figures, boots=len(results),
        run_name=last.run_name, devices=[d for r in results for d in r.devices])
