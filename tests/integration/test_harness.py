"""The guest helper's harness, in a real guest: a check that crashes or hangs fails alone, and the rest run."""

from __future__ import annotations

import json
from pathlib import Path

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
