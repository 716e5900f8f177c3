"""``aperture up / ls / down / console``: long-lived VMs run by a background daemon (emulator/daemon.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aperture.emulator.config import VmConfig, config_to_dict
from aperture.emulator.daemon.control import ControlRefused, call
from aperture.emulator.daemon.registry import VmRecord, check_name, read_record, reap_orphan, remove_record
from aperture.emulator.processes import parent_pid
from aperture.emulator.vm.snapshots import not_snapshottable
from aperture.emulator.vm.warm import BootInputs, ensure_snapshot
from aperture.guest.errors import ConfigError, DaemonGone, GuestError
from aperture.guest.kernelspec import KernelSpec

Progress = Callable[[str], None]


def up(name: str, config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress,
       cold: bool = False) -> VmRecord:
    """Start the daemon and wait until the guest says it is ready (or the daemon dies). The VM is restored from
    its warm-start snapshot (found or made here, in the foreground) unless ``cold`` or it cannot be."""
    check_name(name)
    existing = read_record(name)
    if existing is not None and existing.alive():
        raise ConfigError(f"a VM named {name!r} is already up (pid {existing.pid}); 'aperture down {name}' first")
    run_dir.mkdir(parents=True, exist_ok=True)
    kernel: KernelSpec = inputs.kernel
    snapshot = None
    why = "--cold" if cold else not_snapshottable(config, run_dir)
    if why is None:
        try:
            snap, why, _ = ensure_snapshot(config, inputs, progress)
            snapshot = str(snap.state) if snap else None
        except GuestError as exc:
            why = f"no snapshot could be made: {exc}"
    if why:
        progress(f"warm start: booting cold: {why}")
    spec = {"name": name, "config": config_to_dict(config), "initrd": str(inputs.image.path), "qemu": inputs.qemu,
            "accel": inputs.accel.accel, "run_dir": str(run_dir.resolve()),
            "kernel": kernel.to_dict(), "snapshot": snapshot}
    spec_path = run_dir / "daemon-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = run_dir / "daemon.log"
    with open(log_path, "wb") as log:
        # The supervisor runs the daemon as its child and cleans up the moment the daemon dies (kill -9).
        proc = subprocess.Popen([sys.executable, "-m", "aperture.emulator.daemon.daemon", "--supervise",
                                 str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
    progress(f"daemon pid {proc.pid} {'restoring' if snapshot else 'booting'} {name} ({inputs.accel.accel}) in "
             f"{run_dir}")
    deadline = time.monotonic() + config.boot_timeout + 30
    try:
        while True:
            rec = read_record(name)
            if rec is not None and parent_pid(rec.pid) == proc.pid and rec.state == "ready":
                return rec
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise GuestError(f"VM {name} failed to start: {tail[0]} (see {log_path})")
            if time.monotonic() > deadline:
                _kill(proc.pid)
                raise GuestError(f"VM {name} did not become ready within {config.boot_timeout:.0f} s "
                                 f"(see {run_dir / 'console.log'})")
            time.sleep(0.1)
    except KeyboardInterrupt:
        _kill(proc.pid)
        raise


def _kill(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the daemon (it cleans up), then SIGKILL its whole process group (the supervisor's session)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.05)


def down(name: str, timeout: float = 20.0) -> str:
    """Shut a VM down cleanly (control socket → QMP quit), then by signal: ``"down"``. A VM whose daemon died
    (kill -9) is reaped exactly as ``ls`` would: ``"reaped"``. ``"not up"`` when there is no such VM."""
    rec = read_record(name)
    if rec is None:
        return "not up"
    if not rec.alive():
        reap_orphan(rec)  # its QEMU (if it outlived the daemon), shm files and sockets
        remove_record(name)
        return "reaped"
    try:
        call(rec.control_socket, "shutdown", timeout=5)
    except (ControlRefused, DaemonGone):
        pass
    end = time.monotonic() + timeout
    while rec.alive() and time.monotonic() < end:
        time.sleep(0.1)
    if rec.alive():
        _kill(rec.pid, 5)
    reap_orphan(rec)  # never leave QEMU, shm files or sockets behind
    remove_record(name)
    return "down"


def follow_console(rec: VmRecord, follow: bool, write: Callable[[str], None]) -> None:
    path = Path(rec.run_dir) / "console.log"
    pos = 0
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        pos += len(data)
        if data:
            write(data.decode("utf-8", "replace"))
        if not follow or not rec.alive():
            return
        time.sleep(0.2)
