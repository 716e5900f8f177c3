"""Start a VM ready for commands (scenario ``idle``: the helper serving, DAX configured, devices probed):
restored from a snapshot when one matches — made the first time a VM of that shape is needed — else booted
cold. What differs per run reaches a restored guest over the command port (its clock, its stamp token); the
NVMe controller, which cannot be migrated, is hot-plugged after the restore."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aperture.emulator.config import VmConfig
from aperture.emulator.vm.accel import AccelChoice
from aperture.emulator.vm.machine import Vm, VmBoot
from aperture.emulator.vm.qemu_argv import NVME_DEVICE
from aperture.emulator.vm.snapshots import (
    SNAPSHOT_TOKEN,
    Snapshot,
    SnapshotKey,
    builder_lock,
    find_snapshot,
    not_snapshottable,
    snapshot_key,
    write_snapshot,
)
from aperture.guest.abi import Env
from aperture.guest.errors import GuestError
from aperture.guest.image import GuestImage
from aperture.guest.kernelspec import KernelSpec
from aperture.qmp_client.snapshot import save_state

Progress = Callable[[str], None]

#: How long a hot-plugged NVMe controller may take to show its namespace in the guest.
NVME_PLUG_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class BootInputs:
    """What a run needs before a VM starts; shared by run, bench and tests."""

    kernel: KernelSpec
    image: GuestImage
    qemu: str
    qemu_version: str
    accel: AccelChoice

    def boot(self) -> VmBoot:
        """What a VM of these inputs boots."""
        return VmBoot(self.kernel, self.image.path, self.qemu, self.accel.accel)


@dataclass
class StartInfo:
    """How a VM started: ``cold`` (booted) or ``restore`` (from ``snapshot``), and why not restored."""

    start: str = "cold"
    restore_s: float | None = None  # QEMU start → state loaded and running
    ready_s: float | None = None  # QEMU start → answering commands (restore: clock, env and NVMe done)
    snapshot: str | None = None
    snapshot_made_s: float | None = None  # this run made the snapshot first (a cold boot and a save)
    note: str | None = None  # why it started cold, when it could have been restored

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def key_for(config: VmConfig, inputs: BootInputs) -> SnapshotKey:
    return snapshot_key(config, inputs.kernel, inputs.image.digest, inputs.qemu, inputs.qemu_version,
                        inputs.accel.accel)


def save_ready(vm: Vm, key: SnapshotKey, root: Path | None = None) -> Snapshot:
    """Save ``vm``, booted as a snapshot's VM and now at its ready state, as the snapshot ``key``. The VM is left
    stopped (``cont`` resumes it)."""
    _check_pristine(vm)
    assert vm.qmp is not None
    qmp = vm.qmp
    return write_snapshot(key, lambda path: save_state(qmp, path), root,
                          extra={"boot_to_ready_s": round(time.monotonic() - vm.started_at, 3)})


def restore_vm(stack: contextlib.ExitStack, config: VmConfig, boot: VmBoot, state: Path,
               guest_env: dict[str, str] | None, *, run_dir: Path, scenario: str = "idle", name: str | None = None,
               console_sink: Callable[[str], None] | None = None, user_qmp: bool = False,
               shell: bool = False) -> tuple[Vm | None, str | None]:
    """A VM restored from ``state`` and made ready (``after_restore``), its cleanup handed to ``stack``; or
    (None, why) when that failed: the VM is gone entirely, and so are the NVDIMM files QEMU may have half
    written (the caller boots cold)."""
    try:
        with contextlib.ExitStack() as attempt:
            vm = attempt.enter_context(Vm(config, boot, run_dir=run_dir, scenario=scenario, name=name,
                                          console_sink=console_sink, user_qmp=user_qmp, shell=shell,
                                          plug_nvme=False, incoming=state))
            after_restore(vm, config, guest_env)
            stack.push(attempt.pop_all())
            return vm, None
    except GuestError as exc:
        for stale in run_dir.glob("pmem*.img"):
            stale.unlink()
        return None, str(exc)


def ensure_snapshot(config: VmConfig, inputs: BootInputs, progress: Progress,
                    root: Path | None = None) -> tuple[Snapshot | None, str | None, float | None]:
    """The snapshot for this VM, made now if there is none (a cold boot to idle and a save). Returns (snapshot,
    why there is none to use, seconds spent making it)."""
    key = key_for(config, inputs)
    snap, why = find_snapshot(key, root)
    if snap is not None or why is not None:
        return snap, why, None
    # One builder per snapshot: a run that finds another making it waits for that one instead of making its own.
    with builder_lock(key, wait_s=config.boot_timeout + 30, root=root) as mine:
        snap, why = find_snapshot(key, root)
        if snap is not None or why is not None:
            return snap, why, None
        if not mine:
            return None, f"another run is still making snapshot {key.key}", None
        progress(f"warm start: no snapshot of this VM yet: booting once to make {key.key}")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="aperture-snapshot-") as tmp, \
                Vm(config, inputs.boot(), run_dir=Path(tmp), scenario="idle", plug_nvme=False,
                   guest_env={Env.STAMP: SNAPSHOT_TOKEN}) as vm:
            vm.wait_idle(min(config.run_timeout, config.boot_timeout))
            snap = save_ready(vm, key, root)
        made = time.monotonic() - t0
    progress(f"warm start: snapshot {key.key} made in {made:.2f} s ({snap.meta['state_size'] >> 20} MiB sparse)")
    return snap, None, made


def _set_env(vm: Vm, guest_env: dict[str, str] | None) -> None:
    env = {k: v for k, v in (guest_env or {}).items() if k.startswith("aperture_")}
    if env:
        done, _ = vm.command({"env": " ".join(f"{k}={v}" for k, v in env.items())}, timeout=10)
        if done.get("rc"):
            raise GuestError(f"the guest refused its environment: {done.get('output')}")


def _plug_nvme(vm: Vm, config: VmConfig) -> None:
    if not config.nvme:
        return
    assert vm.qmp is not None
    vm.qmp.call(vm.qmp.session.execute("device_add", dict(NVME_DEVICE)))
    # Its namespace when the kernel has an NVMe driver (built in, or loaded), else the PCI function itself.
    steps = int(NVME_PLUG_TIMEOUT_S / 0.01)
    wait = (f"for i in $(seq {steps}); do if [ -d /sys/bus/pci/drivers/nvme ]; then [ -e /dev/nvme0n1 ] && "
            "exit 0; elif grep -qx 0x010802 /sys/bus/pci/devices/*/class; then exit 0; fi; sleep 0.01; done; exit 1")
    rc, _ = vm.exec(wait, timeout=NVME_PLUG_TIMEOUT_S + 5)
    if rc != 0:
        raise GuestError("the NVMe controller plugged in after the restore never showed up in the guest")


def after_restore(vm: Vm, config: VmConfig, guest_env: dict[str, str] | None) -> None:
    """A restored guest's clock is the snapshot's: set it; give it this run's variables; plug the NVMe in."""
    now = time.time_ns()
    vm.command({"clock": now // 1_000_000_000, "clock_ns": now % 1_000_000_000}, timeout=10)
    _set_env(vm, guest_env)
    _plug_nvme(vm, config)


def _check_pristine(vm: Vm) -> None:
    """The devices must be untouched at the ready state: a restore starts their memory files empty."""
    if vm.service is not None:
        for stats in vm.service.stats():
            slots = stats.get("slots")
            if stats.get("completed") or (isinstance(slots, list) and any(p is not None for p in slots)):
                raise GuestError(f"device {stats.get('index')} was used before the ready state: no snapshot")


@contextlib.contextmanager
def ready_vm(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *, cold: bool = False,
             name: str | None = None, user_qmp: bool = False, shell: bool = False,
             console_sink: Callable[[str], None] | None = None, guest_env: dict[str, str] | None = None,
             on_setup: Callable[[dict[str, Any]], None] | None = None) -> Iterator[tuple[Vm, StartInfo]]:
    """A VM in scenario ``idle``, restored when it can be (``cold``: booted, and no snapshot is made). A cold
    boot hands the helper's messages before ready (hello, the setup checks) to ``on_setup``."""
    info = StartInfo(note="--cold: booted, no snapshot used" if cold else None)
    snap = None
    key: SnapshotKey | None = None
    if not cold:
        info.note = not_snapshottable(config, run_dir)
        if info.note is None:
            key = key_for(config, inputs)
            snap, info.note = find_snapshot(key)
    boot = inputs.boot()
    common: dict[str, Any] = dict(run_dir=run_dir, scenario="idle", name=name, console_sink=console_sink,
                                  user_qmp=user_qmp, shell=shell)
    with contextlib.ExitStack() as stack:
        vm: Vm | None = None
        if snap is not None:
            vm, failed = restore_vm(stack, config, boot, snap.state, guest_env, **common)
            if vm is not None:
                info.start, info.snapshot, info.restore_s = "restore", snap.key, vm.restore_s
                info.ready_s = round(time.monotonic() - vm.started_at, 3)
                progress(f"restored {vm.name} from {snap.key} in {vm.restore_s or 0:.2f} s; ready "
                         f"{info.ready_s:.2f} s after QEMU start")
            else:  # the run boots cold in a fresh VM
                info.note = f"restoring snapshot {snap.key} failed ({failed}): booted cold"
                shutil.rmtree(snap.directory, ignore_errors=True)  # the next run makes a new one
                key = None
        # One builder per snapshot, the lock held from the boot to the save: a run that finds another making it
        # boots cold rather than making a second copy of the same snapshot.
        builder = contextlib.ExitStack()
        stack.push(builder)
        if vm is None and key is not None and info.note is None and not builder.enter_context(builder_lock(key)):
            info.note = f"another run is making snapshot {key.key}: booted cold"
        if vm is None and key is not None and info.note is None:
            # The first VM of this shape: boot it as a snapshot's VM is booted, save it at the ready state,
            # and go on with it (the save costs a second or two; no second boot).
            progress(f"warm start: no snapshot of this VM yet: making {key.key} from this boot")
            vm = stack.enter_context(Vm(config, boot, plug_nvme=False, guest_env={Env.STAMP: SNAPSHOT_TOKEN},
                                        **common))
            vm.wait_idle(min(config.run_timeout, config.boot_timeout), on_message=on_setup)
            t0 = time.monotonic()
            try:
                made = save_ready(vm, key)
                info.snapshot, info.snapshot_made_s = made.key, round(time.monotonic() - t0, 3)
                progress(f"warm start: snapshot {made.key} saved in {info.snapshot_made_s:.2f} s")
            except GuestError as exc:
                info.note = f"no snapshot could be made: {exc}"
            finally:
                builder.close()  # saved (or failed): the next run restores it
                if vm.qmp is not None and not vm.qmp.execute("query-status").get("running"):
                    vm.qmp.cont()
            _set_env(vm, guest_env)
            _plug_nvme(vm, config)
            info.ready_s = round(time.monotonic() - vm.started_at, 3)
        if vm is None:
            if info.note:
                progress(f"warm start: {info.note}")
            vm = stack.enter_context(Vm(config, boot, guest_env=guest_env, **common))
            vm.wait_idle(min(config.run_timeout, config.boot_timeout), on_message=on_setup)
            info.ready_s = round(time.monotonic() - vm.started_at, 3)
        yield vm, info
