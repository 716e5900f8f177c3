"""The pytest plugin: the project's own tests use it, and a user's project gets it by installing the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.aperture(pmem=["64M:devdax"], devices=2, guest_bins=["/usr/bin/stat"])
def test_fixture_exec_map_and_scenario(aperture_vm) -> None:
    assert aperture_vm.exec("uname -r").rc == 0
    assert "GNU coreutils" in aperture_vm.exec("/usr/local/bin/stat --version").output  # not busybox's stat
    assert aperture_vm.exec("exit 3").rc == 3
    ms = aperture_vm.map(0, 2, 11)  # host-side, VM paused around it
    assert ms > 0
    r = aperture_vm.exec("aperture-helper poke 0 2 0 abcd && aperture-helper peek 0 2 0 2")
    assert r.output.split()[-1] == "abcd"
    aperture_vm.map(0, 2, None)  # unmapped: written back to device memory
    dev = aperture_vm.devices[0]
    assert bytes(dev.devmem.view[11 * dev.config.slot : 11 * dev.config.slot + 2]) == b"\xab\xcd"
    checks = aperture_vm.run_scenario("nvdimm")
    assert checks["nvdimm.present"].ok
    assert checks["nvdimm.present"].detail["regions"][0]["size"] == 64 << 20
    assert aperture_vm.results()["ok"]


def _user_project(tmp_path: Path) -> Path:
    proj = tmp_path / "userproj"
    proj.mkdir()
    shutil.copy(ROOT / "examples" / "test_example.py", proj / "test_example.py")
    # The user's project has its own `guest` and `emulator` packages: aperture's installed names
    # (aperture.guest, aperture.emulator) neither shadow them nor are shadowed by them.
    for pkg in ("guest", "emulator"):
        (proj / pkg).mkdir()
        (proj / pkg / "__init__.py").write_text("")
        (proj / pkg / "local.py").write_text(f"OWNER = 'user {pkg}'\nEXPECTED_RC = 0\n")
    (proj / "test_failing.py").write_text(
        "import pytest\nfrom guest.local import EXPECTED_RC\n\n@pytest.mark.aperture(devices=1)\n"
        "def test_fails(aperture_vm):\n    assert aperture_vm.exec('false').rc == EXPECTED_RC\n")
    (proj / "test_own_packages.py").write_text(
        "import aperture.guest\nimport emulator.local\nimport guest.local\n\n"
        "def test_own_packages():\n"
        "    assert (guest.local.OWNER, emulator.local.OWNER) == ('user guest', 'user emulator')\n"
        "    assert aperture.guest.__file__ != guest.__file__\n")
    return proj


@pytest.mark.parametrize("workers", [None, "2"])
def test_user_project_with_and_without_xdist(tmp_path: Path, workers: str | None) -> None:
    proj = _user_project(tmp_path)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt")]
    if workers:
        argv += ["-n", workers]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(argv, cwd=proj, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the one failing test fails; the examples pass
    assert "5 passed" in out and "1 failed" in out, out
    assert "aperture console tail" in out and "aperture run dir" in out
    assert processes_mentioning(str(tmp_path / "bt")) == []
