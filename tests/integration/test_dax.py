"""DAX and ZONE_DEVICE in a real guest: fsdax + devdax via sysfs, MAP_SYNC, persistence across reboots,
the struct-page probe matrix, and refusal to destroy foreign NVDIMM data without --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import checks_by_name as _checks
from tests.conftest import run_aperture

PMEM_FILE_SIZE = 256 * 2**20  # label-less: the file is the data



def _run_json(*args: str) -> tuple[int, dict, str]:
    proc = run_aperture("run", "--json", "-q", *args, timeout=300)
    assert "Traceback" not in proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


@pytest.fixture(scope="module")
def reboot_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One `--reboot` run shared by the read-only assertions below (two boots, one run dir)."""
    run_dir = tmp_path_factory.mktemp("dax") / "run"
    code, result, err = _run_json("--reboot", "--run-dir", str(run_dir))
    assert code == 0, err
    return result, run_dir


def test_every_dax_check_ok(reboot_run) -> None:
    result, _ = reboot_run
    checks = _checks(result)
    for name in ("nvdimm.present", "dax.fsdax", "dax.devdax", "dax.map_sync", "dax.persistence",
                 "zone_device.probe"):
        assert checks[name]["ok"], checks[name]
    assert result["boots"] == 2
    assert checks["dax.persistence"]["detail"]["fsdax"] is True
    assert checks["dax.persistence"]["detail"]["devdax"] is True
    # device memory written through the windows in the first boot was found intact by the second
    assert checks["aperture.persistence"]["ok"]
    assert all(d["intact"] == d["pages_checked"] > 8 for d in checks["aperture.persistence"]["detail"]["devices"])
    # The second boot found the NVDIMMs already configured and reused them.
    assert checks["dax.fsdax"]["detail"]["action"] == "reused"
    assert checks["dax.devdax"]["detail"]["action"] == "reused"


@pytest.mark.parametrize("name", ["dax.fsdax", "dax.devdax"])
def test_host_reads_back_the_guest_stamp(reboot_run, name: str) -> None:
    """Independent of the run's own verifier: open the backing file and look."""
    result, run_dir = reboot_run
    detail = _checks(result)[name]["detail"]
    path, offset = Path(detail["host_file"]), detail["host_offset"]
    assert path.parent == run_dir.resolve()
    unit = detail["stamp"].encode()
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(detail["stamp_len"])
    assert data == (unit * (len(data) // len(unit) + 1))[: len(data)]
    assert detail["stamp_phys"] - detail["region_addr"] == offset


@pytest.mark.parametrize(("name", "mode", "key"), [("dax.fsdax", "fsdax", "blockdev"),
                                                  ("dax.devdax", "devdax", "chardev")])
def test_ndctl_witnesses_the_modes_set_through_sysfs(reboot_run, name: str, mode: str, key: str) -> None:
    """ndctl (Debian's, copied into the image) lists the namespace in the mode the helper configured."""
    witness = _checks(reboot_run[0])[name]["detail"]["ndctl_witness"]
    assert witness["present"] and witness["ok"], witness
    assert witness["mode"] == mode and witness["namespace"].startswith("namespace")
    assert "/dev/" + witness["device"] == _checks(reboot_run[0])[name]["detail"]["device"]


def test_fsdax_fiemap_and_pagemap_agree(reboot_run) -> None:
    detail = _checks(reboot_run[0])["dax.fsdax"]["detail"]
    assert detail["statx_dax"] is True
    assert detail["pagemap_phys"] == detail["stamp_phys"] == detail["data_phys"] + detail["fiemap_physical"]


def test_probe_matrix_matches_kernel_config(reboot_run) -> None:
    detail = _checks(reboot_run[0])["zone_device.probe"]["detail"]
    rows = {r["memory"]: r for r in detail["rows"]}
    assert rows["ram"]["result"] == "ok"
    assert rows["devdax"]["result"] == "ok"
    assert rows["fsdax"]["result"] == "ok"
    assert rows["bar"]["result"] == "EFAULT"  # no struct page behind a PFN mapping
    assert rows["bar"]["pagemap_phys"] == 0  # pagemap reports no PFN for a BAR mapping
    assert rows["bar"]["phys"] == detail["qmp_bar2"][0]
    # The built kernel (the default) publishes the NVMe CMB as p2pmem: O_DIRECT into it works, at a physical
    # address inside the NVMe's BAR.
    assert rows["p2pmem"]["result"] == "ok" and rows["p2pmem"]["phys_ok"] is True
    assert rows["p2pmem"]["source"].startswith("/dev/nvme")
    assert all(r["matches"] for r in rows.values())


def test_corrupted_info_block_is_refused_then_forced(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    garbage = b"NOT-AN-INFO-BLOCK" * 8
    for i in range(2):
        with open(run_dir / f"pmem{i}.img", "wb") as f:
            f.truncate(PMEM_FILE_SIZE)
    with open(run_dir / "pmem0.img", "r+b") as f:
        f.seek(4096)
        f.write(garbage)
    code, result, _ = _run_json("--run-dir", str(run_dir))
    assert code == 1
    fsdax = _checks(result)["dax.fsdax"]
    assert not fsdax["ok"] and "--force" in fsdax["detail"]["error"]
    assert _checks(result)["dax.devdax"]["ok"]  # the other NVDIMM is unaffected
    with open(run_dir / "pmem0.img", "rb") as f:
        f.seek(4096)
        assert f.read(len(garbage)) == garbage  # nothing destroyed
    code, result, err = _run_json("--run-dir", str(run_dir), "--force")
    assert code == 0, err
    assert _checks(result)["dax.fsdax"]["detail"]["action"] == "reconfigured"


def test_foreign_mode_is_refused_then_forced(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, _, err = _run_json("--run-dir", str(run_dir), "--pmem", "256M:devdax", "--pmem", "256M:fsdax")
    assert code == 0, err
    code, result, _ = _run_json("--run-dir", str(run_dir))
    assert code == 1
    checks = _checks(result)
    assert "holds a devdax info block" in checks["dax.fsdax"]["detail"]["error"]
    assert "holds a fsdax info block" in checks["dax.devdax"]["detail"]["error"]
    code, result, err = _run_json("--run-dir", str(run_dir), "--force")
    assert code == 0, err
    assert {_checks(result)[n]["detail"]["action"] for n in ("dax.fsdax", "dax.devdax")} == {"reconfigured"}


def test_pmem_size_mismatch_with_existing_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "pmem0.img").write_bytes(b"\0" * 4096)
    proc = run_aperture("run", "--run-dir", str(run_dir), timeout=120)
    assert proc.returncode == 2
    assert "exists with" in proc.stderr
