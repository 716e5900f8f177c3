"""The guest helper's harness, in a real guest: a check that crashes or hangs fails alone, and the rest run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_aperture


def test_a_crashing_and_a_hanging_check_fail_alone(tmp_path: Path) -> None:
    # aperture_fault makes dax.fsdax's process die of SIGSEGV and aperture.window's hang (5 s limit).
    proc = run_aperture("run", "--json", "--run-dir", str(tmp_path / "run"),
                        "--append", "aperture_fault=dax.fsdax:segv,aperture.window:hang", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a check failed: nothing else went wrong
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    crashed, hung = checks["dax.fsdax"], checks["aperture.window"]
    assert not crashed["ok"]
    assert crashed["detail"]["harness"] == "crashed" and crashed["detail"]["signal"] == "SIGSEGV"
    assert not hung["ok"]
    assert hung["detail"] == {"harness": "timeout", "timeout_s": 5}
    # Every other check still ran, after both, and passed.
    failed = sorted(name for name, c in checks.items() if not c["ok"])
    assert failed == ["aperture.window", "dax.fsdax"]
    assert {"dax.map_sync", "dax.devdax", "p2p.ram_to_device", "aperture.bad_descriptors",
            "p2p.nvme_cmb", "witness.hmm_tests"} <= set(checks)


def test_an_exception_in_the_emulator_thread_fails_the_run_and_is_logged(
        tmp_path: Path, built_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device thread raises once (as a guest-provoked bug would): the run fails with a host check naming
    the exception, and run_dir/emulator.log has it with its traceback."""
    from aperture.emulator.config import VmConfig
    from aperture.emulator.model.device import ApertureDevice
    from aperture.emulator.runs.run import boot_once, prepare_inputs

    real = ApertureDevice.process_ring
    raised: list[bool] = []

    def fails_once(self: ApertureDevice, doorbell: bool = True) -> int:
        if not raised:
            raised.append(True)
            raise RuntimeError("emulator thread test fault")
        return real(self, doorbell)

    monkeypatch.setattr(ApertureDevice, "process_ring", fails_once)
    config = VmConfig(nvme=0)
    inputs = prepare_inputs(config, built_kernel, lambda _msg: None)
    result = boot_once(config, inputs, tmp_path / "run", lambda _msg: None, scenario="aperture")
    assert not result.ok
    thread = next(c for c in result.checks if c.name == "host.emulator_thread")
    assert not thread.ok and thread.detail["errors"] == 1
    assert thread.detail["first"] == ["RuntimeError: emulator thread test fault"]
    log = (tmp_path / "run" / "emulator.log").read_text()
    assert "emulator thread test fault" in log and "Traceback" in log
