"""Whatever process dies, QEMU does not run on and nothing stays: kill -9 of `aperture run` mid-boot."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from emulator.machine import reap_dead_runs
from tests.conftest import aperture_argv, qemu_processes


def test_kill_9_of_run_mid_boot_leaves_nothing_within_5_s(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(aperture_argv() + ["run", "-q", "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not qemu_processes(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    line = qemu_processes(str(run_dir))
    assert line, "QEMU never started"
    argv = line[0].split()
    name = argv[argv.index("-name") + 1]
    time.sleep(1.0)  # mid-boot
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while qemu_processes(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_processes(str(run_dir)), "QEMU outlived the process that owned its device model"
    # The names were unlinked as soon as QEMU and the device model held the files open: nothing to reap.
    shm = Path(os.environ.get("APERTURE_SHM", "/dev/shm"))
    assert not [p for p in shm.iterdir() if name in p.name]
    assert not (Path(tempfile.gettempdir()) / f"aperture-{os.getuid()}" / name).exists()
    assert name not in reap_dead_runs(shm)
