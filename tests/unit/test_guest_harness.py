"""The guest helper's harness, compiled and run on the host: checks register themselves (TEST) and each scenario
runs the ones tagged for it, in order, after --only/--skip; expectations (EXPECT_*) name the first condition that
failed with both values; SKIP is a skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[2] / "guest" / "helper"
DRIVER = Path(__file__).resolve().parents[2] / "guest" / "driver"

DEFAULT_ORDER = [
    "guest.modules", "guest.shares", "nvdimm.present", "dax.persistence", "dax.fsdax", "dax.map_sync", "dax.devdax",
    "zone_device.probe", "aperture.persistence", "aperture.window", "aperture.hidden_refused", "p2p.pmem_to_device",
    "p2p.device_to_pmem", "p2p.ram_to_device", "p2p.device_to_device", "aperture.bad_descriptors",
    "zone_device.p2pmem", "p2p.nvme_cmb", "witness.hmm_tests", "driver.unload", "zone_device.window", "hmm.migrate",
    "hmm.fault_back", "p2p.peer_map", "p2p.peer_map_hidden", "p2p.pinned_vs_remap",
]


def _gcc(out: Path, *sources: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on this host")
    subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", f"-I{HELPER}", f"-I{DRIVER}", "-o", str(out),
                    *map(str, sources)], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _gcc(tmp_path_factory.mktemp("helper") / "aperture-helper", *sorted(HELPER.glob("*.c")))


def _list(helper: Path, scenario: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("aperture_")}
    out = subprocess.run([str(helper), "list", scenario], env=dict(clean, **env), capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return out.split()


def test_scenarios_run_their_tagged_checks_in_order(helper: Path) -> None:
    assert _list(helper, "default") == DEFAULT_ORDER
    assert _list(helper, "nvdimm") == ["guest.modules", "guest.shares", "nvdimm.present"]
    assert _list(helper, "remap") == ["guest.modules", "nvdimm.present", "remap.consistency"]
    assert _list(helper, "fuzz") == ["guest.modules", "aperture.fuzz"]
    assert _list(helper, "driver") == DEFAULT_ORDER[DEFAULT_ORDER.index("driver.unload"):]
    assert _list(helper, "dax") == DEFAULT_ORDER[3:8]


def test_only_and_skip_select_in_the_guest(helper: Path) -> None:
    assert _list(helper, "default", aperture_only="dax.*,hmm.*", aperture_skip="dax.map_sync") == [
        "dax.persistence", "dax.fsdax", "dax.devdax", "hmm.migrate", "hmm.fault_back"]
    assert _list(helper, "default", aperture_only="", aperture_skip="") == DEFAULT_ORDER


def test_expectations_name_the_first_failed_condition_and_skip_is_a_skip(tmp_path: Path) -> None:
    test = tmp_path / "t.c"
    test.write_text('#include "harness.h"\n#include "report.h"\nint main(void)\n{\n'
                    "    EXPECT_EQ(2 + 2, 5);\n    EXPECT_EQ(1, 1);\n    EXPECT_LE(9, 3);\n"
                    '    report_check("x.first", 1, "{\\"a\\":1}");\n'
                    '    report_check("x.after", 1, "{}");\n'
                    '    report_skip("x.skipped", "no driver here");\n    return 0;\n}\n')
    prog = _gcc(tmp_path / "t", test, HELPER / "report.c", HELPER / "util.c")
    lines = [json.loads(x) for x in subprocess.run([str(prog)], capture_output=True, text=True,
                                                    check=True).stdout.splitlines()]
    first, after, skipped = lines
    assert first["ok"] is False and first["detail"]["a"] == 1
    assert first["detail"]["failed"] == {"expr": "2 + 2 == 5", "got": 4, "want": 5, "line": 5, "count": 2}
    assert after["ok"] is True and after["detail"] == {}  # reporting resets the expectations
    assert skipped["ok"] is True and skipped["detail"] == {"skip_reason": "no driver here"}

    from aperture.emulator.runs.results import Check

    assert Check.from_message(skipped).status == "skip"  # type: ignore[union-attr]
