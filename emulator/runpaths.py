"""Where a run keeps things: its directory (data that persists: NVDIMM, NVMe and device-memory files, logs),
/dev/shm (RAM and window backing, gone with the run) and a short socket directory; and how runs are named."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aperture.emulator.processes import pid_alive
from aperture.guest.errors import ConfigError
from aperture.guest.units import format_size


@dataclass(frozen=True)
class DeviceFiles:
    devmem: Path  # persisted device memory (run dir)
    window: Path  # the window BAR's backing file (shm)
    socket: Path  # our ivshmem server socket


@dataclass(frozen=True)
class RunPaths:
    """Every path a run uses. Data (pmem images, logs) stays in ``run_dir``; RAM lives in /dev/shm."""

    run_dir: Path
    name: str
    shm_dir: Path
    sock_dir: Path  # short path: unix socket names are limited to 107 bytes

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def results(self) -> Path:
        return self.run_dir / "results.jsonl"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def qmp_socket(self) -> Path:
        return self.sock_dir / "qmp.sock"

    @property
    def user_qmp_socket(self) -> Path:
        """A second QMP monitor for people and scripts (the first belongs to the emulator)."""
        return self.sock_dir / "qmp-user.sock"

    @property
    def gdb_socket(self) -> Path:
        """QEMU's gdbstub (--gdb): `aperture gdb NAME` attaches gdb here."""
        return self.sock_dir / "gdb.sock"

    @property
    def control_socket(self) -> Path:
        return self.sock_dir / "control.sock"

    @property
    def command_socket(self) -> Path:
        """Host → guest commands for the helper's `serve` loop (virtio-serial port aperture.cmd)."""
        return self.sock_dir / "cmd.sock"

    @property
    def shell_socket(self) -> Path:
        """The interactive shell's port (virtio-serial aperture.shell; see guest/helper/shell.c)."""
        return self.sock_dir / "shell.sock"

    def devmem(self, index: int) -> Path:
        return self.run_dir / f"devmem{index}.img"

    def window(self, index: int) -> Path:
        return self.shm_dir / f"aperture-{self.name}-win{index}"

    def device_socket(self, index: int) -> Path:
        return self.sock_dir / f"aperture{index}.sock"

    def device_files(self, count: int) -> list[DeviceFiles]:
        return [DeviceFiles(self.devmem(i), self.window(i), self.device_socket(i)) for i in range(count)]

    @property
    def nvme(self) -> Path:
        """The NVMe namespace's backing file (persists in the run dir, as NVDIMM files do)."""
        return self.run_dir / "nvme0.img"

    def pmem(self, index: int) -> Path:
        return self.run_dir / f"pmem{index}.img"

    @property
    def ram(self) -> Path:
        return self.shm_dir / f"aperture-{self.name}-ram"

    @property
    def probe_bar(self) -> Path:
        return self.shm_dir / f"aperture-{self.name}-probebar"

    def shm_files(self, devices: int = 0) -> list[Path]:
        return [self.ram, self.probe_bar] + [self.window(i) for i in range(devices)]


def default_sock_dir(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"aperture-{os.getuid()}" / name


#: What new_run_name() makes: time, pid, random.
AUTO_NAME = re.compile(r"\d{8}-\d{6}-(\d+)-[0-9a-f]{4}")


def new_run_name() -> str:
    """Time, pid and a random suffix: unique per run, and the pid tells a live run's directory apart."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"


def reap_dead_runs(shm_dir: Path) -> list[str]:
    """Shm files and socket directories of auto-named runs whose process died without cleaning up (kill -9):
    their QEMU died with them (``die_with_parent``), so only files are left. Returns the names reaped."""
    names = {m.group(0) for p in shm_dir.glob("aperture-*") if (m := AUTO_NAME.search(p.name))}
    sock_base = default_sock_dir("-").parent
    if sock_base.is_dir():
        names |= {p.name for p in sock_base.iterdir() if AUTO_NAME.fullmatch(p.name)}
    reaped = []
    for name in sorted(names):
        pid = int(name.split("-")[2])
        if pid == os.getpid() or pid_alive(pid):
            continue
        for path in shm_dir.glob(f"aperture-{name}-*"):
            path.unlink(missing_ok=True)
        shutil.rmtree(default_sock_dir(name), ignore_errors=True)
        reaped.append(name)
    return reaped


def persistent_file(path: Path, size: int, option: str) -> None:
    """A backing file that keeps its contents across runs of one run dir: created sparse, or reused at its size."""
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)
    elif path.stat().st_size != size:
        raise ConfigError(f"{path} exists with {format_size(path.stat().st_size)} but the configuration wants "
                          f"{format_size(size)}; use another --run-dir or the same {option}")
