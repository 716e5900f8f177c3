"""--only/--skip: validated once against the check names; what the guest is told; what the host keeps."""

import pytest
from aperture.emulator.selection import CheckSelection
from aperture.guest.abi import Env
from aperture.guest.errors import ConfigError


def test_globs_select_by_name() -> None:
    sel = CheckSelection(only=("dax.*",), skip=("dax.map_sync",))
    assert sel.selects("dax.fsdax") and sel.selects("dax.devdax")
    assert not sel.selects("dax.map_sync")
    assert not sel.selects("nvdimm.present")
    assert CheckSelection().selects("anything.at_all") and CheckSelection().everything


def test_guest_env_carries_both_lists() -> None:
    sel = CheckSelection(only=("dax.*", "hmm.migrate"), skip=("dax.devdax",))
    assert sel.guest_env() == {Env.ONLY: "dax.*,hmm.migrate", Env.SKIP: "dax.devdax"}
    # An empty selection still tells a restored guest to forget an earlier one.
    assert CheckSelection().guest_env() == {Env.ONLY: "", Env.SKIP: ""}


def test_unknown_pattern_is_one_line_listing_the_checks() -> None:
    with pytest.raises(ConfigError) as err:
        CheckSelection(only=("nosuch",))
    text = str(err.value)
    assert "\n" not in text and "'nosuch'" in text and "hmm.migrate" in text and "dax.fsdax" in text


@pytest.mark.parametrize("pattern", ["dax fsdax", "dax.*,hmm.*", "DAX.*", "", "x" * 65])
def test_patterns_that_would_break_the_guest_lists_are_refused(pattern: str) -> None:
    with pytest.raises(ConfigError):
        CheckSelection(skip=(pattern,))


def test_status_ktap_and_junit_agree_on_pass_fail_skip() -> None:
    import xml.etree.ElementTree as ET

    from aperture.emulator.runs.results import Check, RunResult, junit_xml, ktap

    checks = [Check("dax.fsdax", True, {"mode": "fsdax"}),
              Check("hmm.migrate", True, {"skip_reason": "no aperture driver in the guest image"}),
              Check("p2p.peer_map", False, {"error": "EIO"})]
    assert [c.status for c in checks] == ["pass", "skip", "fail"]
    result = RunResult(ok=False, accel="tcg", accel_reason="", qemu_version="10.0.2", kernel_release="6.12",
                       boot_s=1.0, poweroff_s=2.0, run_dir="/tmp/x", checks=checks)
    assert [c["status"] for c in result.to_json()["checks"]] == ["pass", "skip", "fail"]
    lines = ktap(result.checks).splitlines()
    assert lines[:2] == ["KTAP version 1", "1..3"]
    assert "ok 1 dax.fsdax" in lines
    assert "ok 2 hmm.migrate # SKIP no aperture driver in the guest image" in lines
    assert "not ok 3 p2p.peer_map" in lines
    suite = ET.fromstring(junit_xml(result))
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["hmm.migrate"].find("skipped") is not None
    assert cases["p2p.peer_map"].find("failure") is not None
    assert cases["dax.fsdax"].find("skipped") is None and cases["dax.fsdax"].find("failure") is None


def test_cli_unknown_pattern_is_exit_2_in_one_line() -> None:
    from tests.conftest import run_aperture

    proc = run_aperture("run", "--only", "nosuch", timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nosuch'" in lines[0] and "dax.fsdax" in lines[0], proc.stderr


def test_every_check_name_has_a_row_in_the_check_table() -> None:
    """The host's one table of checks (results.CHECKS): a check added to the ABI without its row fails here."""
    from aperture.emulator.runs.results import CHECKS
    from aperture.guest.abi import CheckName

    assert set(CHECKS) == {c.value for c in CheckName}
    assert {e.runs_in for e in CHECKS.values()} <= {"default", "remap", "fuzz", "host"}


def test_summary_lines_come_from_the_table() -> None:
    from aperture.emulator.runs.results import summary_line

    assert summary_line("hmm.migrate", {"skip_reason": "no driver"}) == "skipped: no driver"
    assert summary_line("p2p.peer_map", {"error": "open /dev/aperture0: ENOENT"}) == "open /dev/aperture0: ENOENT"
    line = summary_line("dax.map_sync", {"mmap": "ok", "bytes": 2 << 20, "flush": "clwb"})
    assert line == "MAP_SYNC mmap ok, 2M written, flushed with clwb, read back"
    assert "its process died of SIGSEGV" in summary_line("dax.fsdax", {"harness": "crashed", "signal": "SIGSEGV"})
