"""`aperture kernel check` / `kernel fragment`: which checks a kernel config can run, and the options to merge."""

import json
from pathlib import Path

from tests.conftest import run_aperture


def test_debian_config_skips_the_driver_checks_and_says_why(debian_kernel) -> None:
    proc = run_aperture("kernel", "check", "--json", str(debian_kernel.config_file), timeout=60)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["checks"]["dax.fsdax"] == {"runs": True, "lacks": []}
    assert report["checks"]["hmm.migrate"]["runs"] is False
    assert "DEVICE_PRIVATE" in report["checks"]["hmm.migrate"]["lacks"]
    assert "PCI_P2PDMA" in report["lacks"]


def test_a_config_with_the_fragment_runs_everything(tmp_path: Path) -> None:
    fragment = run_aperture("kernel", "fragment", timeout=60).stdout
    options = [line for line in fragment.splitlines() if line.startswith("CONFIG_")]
    assert "CONFIG_DEVICE_PRIVATE=y" in options and "CONFIG_PCI_P2PDMA=y" in options
    assert all(not line.startswith("CONFIG_") or " " not in line for line in fragment.splitlines())  # merge_config
    config = tmp_path / ".config"
    config.write_text(fragment + "CONFIG_MMU_NOTIFIER=y\nCONFIG_MIGRATION=y\n")  # selected, never set by hand
    proc = run_aperture("kernel", "check", str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skips" not in proc.stdout


def test_not_a_kernel_is_one_line(tmp_path: Path) -> None:
    proc = run_aperture("kernel", "check", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_tree_lacking_options_is_refused_in_one_line_or_skips_exactly_those_checks(tmp_path: Path) -> None:
    import pytest
    from aperture.emulator.runs.run import refuse_or_skip
    from aperture.emulator.selection import CheckSelection
    from aperture.guest.errors import ConfigError
    from aperture.guest.kernelspec import KernelSpec

    fragment = run_aperture("kernel", "fragment", timeout=60).stdout
    config = tmp_path / ".config"
    config.write_text(fragment.replace("CONFIG_DEVICE_PRIVATE=y", "# CONFIG_DEVICE_PRIVATE is not set")
                      + "CONFIG_MMU_NOTIFIER=y\nCONFIG_MIGRATION=y\n")
    tree = KernelSpec(tmp_path / "vmlinux", None, "6.12", config, "tree", build_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        refuse_or_skip(tree, False, CheckSelection())
    text = str(err.value)
    assert "\n" not in text and "CONFIG_DEVICE_PRIVATE" in text and "hmm.migrate" in text and "dax.fsdax" not in text
    selection, skipped = refuse_or_skip(tree, True, CheckSelection())
    names = {c.name for c in skipped}
    assert "hmm.migrate" in names and "witness.hmm_tests" in names and "dax.fsdax" not in names
    assert all(c.status == "skip" and "CONFIG_DEVICE_PRIVATE" in c.skip_reason for c in skipped)
    assert not selection.selects("hmm.migrate") and selection.selects("dax.fsdax")
    built = KernelSpec(tmp_path / "vmlinux", None, "6.12", config, "built")  # only trees are judged up front
    assert refuse_or_skip(built, False, CheckSelection()) == (CheckSelection(), [])
