"""Shared real boots: one default `aperture run --json` serves every test that only reads its result."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_aperture


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    run_dir = tmp_path_factory.mktemp("default") / "run"
    proc = run_aperture("run", "--json", "--run-dir", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-3000:]
    return proc, json.loads(proc.stdout), run_dir
