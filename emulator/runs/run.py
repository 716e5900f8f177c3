"""Orchestrate one run: image → accelerator → VM → helper messages → verified checks → ``RunResult``."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aperture.emulator.config import RemapPlan, VmConfig
from aperture.emulator.processes import pid_alive
from aperture.emulator.runpaths import AUTO_NAME, reap_dead_runs
from aperture.emulator.runs.kernel_log import kernel_log_check
from aperture.emulator.runs.results import (
    Check,
    HostVerifier,
    RunResult,
    UntouchableFiles,
    checks_a_config_runs,
    driver_claims,
    emulator_thread_check,
    pinned_vs_remap,
    remap_consistency,
    remap_hotplug,
    verify_fuzz,
)
from aperture.emulator.selection import CheckSelection
from aperture.emulator.spec import VmSpec
from aperture.emulator.vm.accel import choose_accel
from aperture.emulator.vm.machine import Vm
from aperture.emulator.vm.snapshots import not_snapshottable
from aperture.emulator.vm.warm import BootInputs, ready_vm
from aperture.guest import abi
from aperture.guest.abi import CheckName, Env, MsgType, Phase
from aperture.guest.cache import cache_root, mtime_or_zero
from aperture.guest.driver_build import DRIVER_MODULE
from aperture.guest.errors import ConfigError, GuestError, SetupError
from aperture.guest.image import build_image
from aperture.guest.kernel import kernel_config
from aperture.guest.kernelspec import KernelSpec
from aperture.qmp_client.qemu import NVME_ID, PROBE_BAR_ID, find_qemu, qemu_version
from aperture.qmp_client.remap import RemapController

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


def prepare(spec: VmSpec, progress: Progress) -> BootInputs:
    """Everything a VM of ``spec`` needs before QEMU starts: its kernel, image, QEMU and accelerator."""
    return prepare_inputs(spec.config, spec.resolve_kernel(), progress)


def unsupported_checks(kernel: KernelSpec) -> dict[str, list[str]]:
    """For a kernel tree (--kernel DIR): the default run's checks its config cannot run, and the options each
    lacks. Other kernels say why a check skips as it runs (Debian's kernel is what it is)."""
    if kernel.kind != "tree":
        return {}
    return {name: opts for name, opts in checks_a_config_runs(kernel_config(kernel)).items() if opts}


def refuse_or_skip(kernel: KernelSpec, skip_unsupported: bool, selection: CheckSelection
                   ) -> tuple[CheckSelection, list[Check]]:
    """A kernel tree that lacks options is refused in one line naming every missing option and the checks that
    need it; with ``skip_unsupported`` those checks do not run and are reported as skips with that reason."""
    lacking = unsupported_checks(kernel)
    if not lacking:
        return selection, []
    options = sorted({o for opts in lacking.values() for o in opts})
    if not skip_unsupported:
        raise ConfigError(f"kernel tree {kernel.build_dir} lacks {', '.join('CONFIG_' + o for o in options)}, needed "
                          f"by {', '.join(lacking)} (turn them on: aperture kernel fragment; or skip those checks)")
    skipped = [Check(name, True, {"skip_reason": f"kernel lacks {', '.join('CONFIG_' + o for o in opts)}"})
               for name, opts in lacking.items() if selection.selects(name)]
    return CheckSelection(selection.only, selection.skip + tuple(lacking)), skipped


def plan_workload(spec: VmSpec, *, remap_every: float | None, remap_mode: str, duration: float, fuzz: bool,
                  reboot: bool) -> tuple[VmSpec, RemapPlan | None]:
    """The run rules for a workload instead of the default checks (host remaps, the fuzzer): what combines with
    what, and the time the run then gets."""
    config = spec.config
    remap = None
    if remap_every is not None:
        if not config.devices:
            raise ConfigError("host remaps need at least one aperture device")
        if reboot:
            raise ConfigError("host remaps and a reboot cannot be combined")
        remap = RemapPlan(every=remap_every, mode=remap_mode, duration=duration)
        if remap_mode == "hotplug" and any(len(d.window_offsets()) < 2 for d in config.devices):
            raise ConfigError("hotplug remaps need device memory with room for the window at two offsets outside "
                              "the hidden ranges")
    if fuzz:
        if not config.devices:
            raise ConfigError("the fuzzer needs at least one aperture device")
        if reboot:
            raise ConfigError("the fuzzer and a reboot cannot be combined")
        if remap is not None and remap.mode != "pause":
            raise ConfigError("the fuzzer takes pause-mode remaps only")
    if remap is not None or fuzz:
        spec = spec.for_workload(duration)
    return spec, remap


def prepare_inputs(config: VmConfig, kernel: KernelSpec, progress: Progress) -> BootInputs:
    reaped = reap_dead_runs(Path(os.environ.get("APERTURE_SHM", "/dev/shm")))
    if reaped:
        progress(f"removed the shm files and sockets of {len(reaped)} run(s) whose process was killed")
    qemu = find_qemu()
    version = qemu_version(qemu)
    progress(f"guest image: building for kernel {kernel.release}")
    image = build_image(kernel, guest_bins=config.guest_bins, user_modules=config.user_modules)
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


class _Collector:
    """What one boot (or one scenario run over the command port) reports: the helper's messages, taken one at a
    time, bounded whatever the guest sends; remap phases start and stop the host's remap controller."""

    def __init__(self, vm: Vm, config: VmConfig, inputs: BootInputs, progress: Progress,
                 remap: RemapPlan | None) -> None:
        self.vm, self.config, self.inputs, self.progress, self.remap = vm, config, inputs, progress, remap
        self.pending: list[Check] = []
        self.notes: list[str] = []
        self.figures: dict[str, float] = {}
        self.written: list[dict[str, Any]] = []
        self.stamps: list[Any] = []
        self.garbage = 0  # unparseable lines on the results channel: the first few become notes, all are counted
        self.controller: RemapController | None = None
        self.remap_stats: Any = None
        self.verifier: HostVerifier | None = None

    def make_verifier(self) -> None:
        """BARs are assigned by the guest's firmware: read the address map once the guest is up."""
        self.verifier = _verifier(self.vm, self.config, self.inputs.kernel, DRIVER_MODULE in self.inputs.image.modules)

    def handle(self, msg: dict[str, Any]) -> None:
        vm, progress = self.vm, self.progress
        kind = msg.get("type")
        if kind == MsgType.HELLO:
            check_helper_abi(msg)
            self.make_verifier()
            progress(f"guest up: helper started {vm.boot_s:.2f} s after QEMU start "
                     f"(guest uptime {msg.get('uptime_s')} s)")
            if msg.get("kernel_release") != self.inputs.kernel.release:
                self.notes.append(f"guest reports kernel {msg.get('kernel_release')}")
        elif kind == MsgType.CHECK:
            check = Check.from_message(msg)
            if check is None:
                self.garbage += 1
                if self.garbage <= MAX_GARBAGE_NOTES:
                    self.notes.append(f"malformed check message ignored: {str(msg)[:160]}")
            else:
                absent = isinstance(check.detail, dict) and check.detail.get("result") == "absent"
                progress(f"  guest: {'ok  ' if check.ok else 'n/a ' if absent else 'FAIL'} {check.name}")
                self.pending.append(check)
                self.written.extend(driver_claims(check)[: max(MAX_RECORDS - len(self.written), 0)])
        elif kind == MsgType.FIGURES and isinstance(msg.get("values"), dict):
            self.figures.update({str(k): float(v) for k, v in msg["values"].items() if isinstance(v, (int, float))})
        elif (kind == MsgType.PHASE and msg.get("name") == Phase.REMAP_START and vm.service
              and not self.controller and vm.qmp is not None):
            # The remap workload runs under the user's plan; a check that asks for remaps itself (the
            # driver's p2p.pinned_vs_remap) names its period.
            plan = self.remap or RemapPlan(every=phase_period(msg), duration=1.0, mode="pause")
            mode = os.environ.get("APERTURE_REMAP_MODE") or plan.mode  # "unsafe": negative control
            self.controller = RemapController(vm.qmp, vm.service.devices, plan.every, mode)
            self.controller.on_replug = vm.service.invalidate_map
            self.controller.start()
            progress(f"guest workload running; remapping every {plan.every * 1e3:g} ms ({plan.mode} mode)")
        elif kind == MsgType.PHASE and msg.get("name") == Phase.REMAP_END and self.controller:
            self.remap_stats = self.controller.stop()
            progress(f"{self.remap_stats.remaps} remaps done")
        elif kind == MsgType.STAMPS and isinstance(msg.get("stamps"), list):
            self.stamps.extend(msg["stamps"][: max(MAX_RECORDS - len(self.stamps), 0)])
        elif kind == MsgType.WRITTEN and isinstance(msg.get("regions"), list):
            self.written.extend(r for r in msg["regions"][: max(MAX_RECORDS - len(self.written), 0)]
                                if isinstance(r, dict))
        elif kind == MsgType.LOG and len(self.notes) < MAX_NOTES:
            self.notes.append(str(msg.get("message"))[:500])
        elif kind == MsgType.GARBAGE:
            self.garbage += 1
            if self.garbage <= MAX_GARBAGE_NOTES:
                self.notes.append(f"unparseable result line: {msg.get('raw')}")

    def close_notes(self) -> None:
        if self.garbage > MAX_GARBAGE_NOTES:
            self.notes.append(f"{self.garbage - MAX_GARBAGE_NOTES} more unparseable or malformed result lines "
                              f"({self.garbage} in all)")
        if self.controller and self.remap_stats is None:
            self.remap_stats = self.controller.stop()

    def verified(self, scenario: str, untouchable: UntouchableFiles | None) -> list[Check]:
        """Verify after the VM is gone: the guest has flushed, QEMU has exited, window slots are written back."""
        checks = [self.verifier.verify(c, self.written) for c in self.pending] if self.verifier else self.pending
        remap, remap_stats = self.remap, self.remap_stats
        if scenario == "fuzz":
            checks = [verify_fuzz(c, untouchable, remap_stats) if c.name == CheckName.APERTURE_FUZZ else c
                      for c in checks]
        elif remap is None:
            checks = [pinned_vs_remap(c, remap_stats) if c.name == CheckName.P2P_PINNED_VS_REMAP else c
                      for c in checks]
        else:
            checks = [remap_consistency(c, remap_stats) if c.name == CheckName.REMAP_CONSISTENCY else c
                      for c in checks]
            if remap.mode == "hotplug":
                checks.append(remap_hotplug(next((c for c in checks if c.name == CheckName.REMAP_CONSISTENCY),
                                                 None), remap_stats))
            if self.verifier:
                checks.append(self.verifier.verify_stamps(self.stamps, self.config.devices))
        return checks


def _selects_some(guest_env: dict[str, str]) -> bool:
    """Whether the run asked for a subset of the checks (then a scenario may well report none)."""
    return bool(guest_env.get(Env.ONLY) or guest_env.get(Env.SKIP))


def boot_once(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *, scenario: str = "default",
              console_sink: Callable[[str], None] | None = None, name: str | None = None,
              guest_env: dict[str, str] | None = None, remap: RemapPlan | None = None) -> RunResult:
    """Boot once, collect the helper's checks and figures, verify them on the host."""
    untouchable = (UntouchableFiles.take(run_dir, [inputs.image.path, inputs.kernel.image]) if scenario == "fuzz"
                   else None)
    with Vm(config, inputs.boot(), run_dir=run_dir, scenario=scenario, console_sink=console_sink, name=name,
            guest_env=guest_env) as vm:
        assert vm.qmp is not None
        progress(f"booting {vm.name} (QEMU {inputs.qemu_version}, {inputs.accel.accel}) in {vm.paths.run_dir}")
        qemu_ver = vm.qmp.version()
        collect = _Collector(vm, config, inputs, progress, remap)
        for msg in vm.messages():
            collect.handle(msg)
        collect.close_notes()
        poweroff_s = vm.wait_poweroff()
        progress(f"guest powered off {poweroff_s:.2f} s after QEMU start")
        device_stats = vm.service.stats() if vm.service else []
        thread_errors = (vm.service.loop_error_count, list(vm.service.loop_errors)) if vm.service else (0, [])
    collect.close_notes()
    checks = collect.verified(scenario, untouchable)
    if thread_errors[0]:
        checks.append(emulator_thread_check(*thread_errors, run_dir))
    checks.append(kernel_log_check(vm.paths.console, inputs.kernel, config.user_modules))
    if not checks and scenario == "default" and not _selects_some(guest_env or {}):
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
        messages=collect.notes,
        figures=collect.figures,
        run_name=vm.name,
        devices=device_stats,
    )


def run_restored(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *,
                 console_sink: Callable[[str], None] | None = None, name: str | None = None,
                 guest_env: dict[str, str] | None = None, cold: bool = False) -> RunResult:
    """The default scenario in a VM started by ``ready_vm`` (restored from a snapshot, or booted cold to idle when
    it cannot be), run over the command port; verified as a boot's checks are."""
    with ready_vm(config, inputs, run_dir, progress, cold=cold, name=name, console_sink=console_sink,
                  guest_env=guest_env) as (vm, info):
        assert vm.qmp is not None
        qemu_ver = vm.qmp.version()
        collect = _Collector(vm, config, inputs, progress, None)
        collect.make_verifier()  # after the NVMe is plugged in: its BARs are in the map
        progress(f"running the checks in {vm.name} ({info.start}) in {vm.paths.run_dir}")
        done, _ = vm.command({"scenario": "default"}, timeout=config.run_timeout, on_message=collect.handle)
        if done.get("rc"):
            raise GuestError(f"the guest could not run the checks: {done.get('output')}")
        vm.exec("sync", timeout=30)  # the NVDIMM file system's metadata, before QEMU goes
        collect.close_notes()
        device_stats = vm.service.stats() if vm.service else []
        thread_errors = (vm.service.loop_error_count, list(vm.service.loop_errors)) if vm.service else (0, [])
    poweroff_s = round(time.monotonic() - vm.started_at, 3)  # QEMU start → QEMU gone
    checks = collect.verified("default", None)
    if thread_errors[0]:
        checks.append(emulator_thread_check(*thread_errors, run_dir))
    checks.append(kernel_log_check(vm.paths.console, inputs.kernel, config.user_modules))
    if not checks and not _selects_some(guest_env or {}):
        raise GuestError("the guest helper reported no checks")
    notes = ([f"warm start: {info.note}"] if info.note else []) + collect.notes
    return RunResult(
        ok=all(c.ok for c in checks), accel=inputs.accel.accel, accel_reason=inputs.accel.reason,
        qemu_version=qemu_ver, kernel_release=inputs.kernel.release,
        boot_s=info.ready_s, poweroff_s=poweroff_s, run_dir=str(vm.paths.run_dir), checks=checks, messages=notes,
        figures=collect.figures, run_name=vm.name, devices=device_stats, start=info.start,
        restore_s=round(info.restore_s, 3) if info.restore_s is not None else None, snapshot=info.snapshot,
        snapshot_made_s=round(info.snapshot_made_s, 3) if info.snapshot_made_s is not None else None)


def run_vm(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *, reboot: bool = False,
           console_sink: Callable[[str], None] | None = None, name: str | None = None,
           remap: RemapPlan | None = None, fuzz: float | None = None, cold: bool = False,
           selection: CheckSelection | None = None) -> RunResult:
    """The default scenario, in a VM restored from a snapshot unless ``cold`` (or it cannot be); with
    ``reboot``, two real boots in the same run dir and persistence checked; with ``remap``, the window workload
    under host-driven remaps instead (remap, fuzz and reboot runs boot cold). ``selection``: only those checks
    run (the guest's harness skips the rest, and the host drops its own that are not selected)."""
    selection = selection or CheckSelection()
    result = _run_vm(config, inputs, run_dir, progress, reboot=reboot, console_sink=console_sink, name=name,
                     remap=remap, fuzz=fuzz, cold=cold, selected_env=selection.guest_env())
    if not selection.everything:
        result.checks = [c for c in result.checks
                         if selection.selects(c.name) or c.name == CheckName.HOST_EMULATOR_THREAD]
        result.ok = all(c.ok for c in result.checks)
    return result


def _run_vm(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *, reboot: bool,
            console_sink: Callable[[str], None] | None, name: str | None, remap: RemapPlan | None,
            fuzz: float | None, cold: bool, selected_env: dict[str, str]) -> RunResult:
    token = secrets.token_hex(4)
    if fuzz is not None:
        return boot_once(config, inputs, run_dir, progress, scenario="fuzz", console_sink=console_sink, name=name,
                         guest_env={**selected_env, Env.STAMP: token, Env.DURATION: f"{fuzz:g}",
                                    Env.REMAP: "1" if remap else "0"}, remap=remap)
    if remap is not None:
        if remap.mode == "hotplug":
            config = dataclasses.replace(config, window_hotplug=True)
        return boot_once(config, inputs, run_dir, progress, scenario="remap", console_sink=console_sink, name=name,
                         guest_env={**selected_env, Env.STAMP: token, Env.DURATION: f"{remap.duration:g}",
                                    Env.REMAP_MODE: remap.mode},
                         remap=remap)
    if not reboot:
        # Restored from a snapshot when one matches (made now if there is none), else booted cold.
        why = "--cold" if cold else not_snapshottable(config, run_dir)
        if why is not None:
            result = boot_once(config, inputs, run_dir, progress, console_sink=console_sink, name=name,
                               guest_env={**selected_env, Env.STAMP: token})
            result.messages.insert(0, f"warm start: booted cold: {why}")
            return result
        return run_restored(config, inputs, run_dir, progress, console_sink=console_sink, name=name,
                            guest_env={**selected_env, Env.STAMP: token})
    first = boot_once(config, inputs, run_dir, progress, console_sink=console_sink, name=name,
                      guest_env={**selected_env, Env.STAMP: token})
    progress("rebooting to verify persistence")
    second = boot_once(config, inputs, run_dir, progress, console_sink=console_sink, name=name,
                       guest_env={**selected_env, Env.STAMP: secrets.token_hex(4), Env.EXPECT: token})
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
