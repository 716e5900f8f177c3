"""Where long-lived VMs (``aperture up``) are recorded: one JSON file per VM in the state directory."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aperture.emulator.processes import pid_alive
from aperture.guest.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")


def state_dir() -> Path:
    env = os.environ.get("APERTURE_STATE")
    base = Path(env) if env else Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "aperture"
    return base / "vms"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"invalid VM name {name!r}: letters, digits, '.', '_', '-' (at most 41 characters)")
    return name


@dataclass
class VmRecord:
    name: str
    pid: int  # the daemon (owns QEMU and the device model)
    qemu_pid: int
    accel: str
    started: float
    run_dir: str
    qmp_socket: str  # a QMP monitor reserved for users
    control_socket: str  # the daemon's domain commands

    @property
    def shell_socket(self) -> str:
        """The guest shell's port, beside the control socket (RunPaths.shell_socket)."""
        return str(Path(self.control_socket).parent / "shell.sock")
    state: str = "starting"  # starting | ready | stopping
    kernel_release: str = ""

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started

    def alive(self) -> bool:
        """The daemon runs."""
        return pid_alive(self.pid)


def record_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def write_record(rec: VmRecord) -> None:
    path = record_path(rec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec), indent=2))
    tmp.replace(path)


def read_record(name: str) -> VmRecord | None:
    try:
        return VmRecord(**json.loads(record_path(name).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def remove_record(name: str) -> None:
    record_path(name).unlink(missing_ok=True)


def list_records() -> list[VmRecord]:
    """Every recorded VM; records whose daemon is gone are removed (a crashed daemon leaves one)."""
    out = []
    d = state_dir()
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        rec = read_record(path.stem)
        if rec is None:
            continue
        if not rec.alive():
            reap_orphan(rec)
            remove_record(rec.name)
            continue
        out.append(rec)
    return out


def reap_orphan(rec: VmRecord) -> None:
    """A daemon that died without cleaning up (SIGKILL, crash) leaves its QEMU, shm files and sockets."""
    import shutil
    import signal

    from aperture.emulator.runpaths import default_sock_dir

    try:
        cmdline = Path(f"/proc/{rec.qemu_pid}/cmdline").read_bytes().split(b"\0")
        if b"-name" in cmdline and rec.name.encode() in cmdline:
            os.kill(rec.qemu_pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass
    remove_shm(rec.name)
    shutil.rmtree(default_sock_dir(rec.name), ignore_errors=True)


def remove_shm(name: str) -> None:
    """The shm files of VM ``name`` (guest RAM, windows, the probe BAR): named after it from the moment they
    exist, so whoever outlives the VM can remove them without a record."""
    shm = Path(os.environ.get("APERTURE_SHM", "/dev/shm"))
    for path in shm.glob(f"aperture-{name}-*"):
        path.unlink(missing_ok=True)
