"""The aperture device in a real guest (default topology: two devices), checked from the host side too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aperture.guest.abi import pattern as device_pattern

from tests.conftest import checks_by_name as _checks
from tests.conftest import run_aperture

MiB = 1 << 20
DEVICE_CHECKS = ("aperture.window", "aperture.hidden_refused", "aperture.bad_descriptors", "p2p.pmem_to_device",
                 "p2p.device_to_pmem", "p2p.ram_to_device", "p2p.device_to_device")



def test_every_device_check_ok(default_run) -> None:
    checks = _checks(default_run[1])
    for name in DEVICE_CHECKS:
        assert checks[name]["ok"], checks[name]


def test_window_remaps_keep_data_and_host_verifies_device_memory(default_run) -> None:
    detail = _checks(default_run[1])["aperture.window"]["detail"]
    assert len(detail["devices"]) == 2
    for dev in detail["devices"]:
        assert dev["pages_cycled"] > dev["nr_slots"]  # every slot was remapped at least once
        assert dev["survived"] == dev["of"] == dev["pages_cycled"]
        assert dev["double_map"] == "EBUSY" and dev["generation"] % 2 == 0
    assert detail["host_verified_regions"] >= 20 and detail["host_mismatches"] == []


def test_device_memory_files_hold_p2p_data(default_run) -> None:
    """Independent of the run's verifier: device 1's page holds what device 0 DMA'd into its window."""
    _, result, run_dir = default_run
    d2d = _checks(result)["p2p.device_to_device"]["detail"]
    assert d2d["status"] == "OK"
    with open(run_dir / "devmem1.img", "rb") as f:
        f.seek(d2d["dst_page"] * 2 * MiB)
        assert f.read(d2d["len"]) == device_pattern(204, d2d["len"])
    pmem = _checks(result)["p2p.pmem_to_device"]["detail"]
    with open(run_dir / "devmem0.img", "rb") as f:
        f.seek(pmem["dst_device_offset"])
        assert f.read(pmem["len"]) == device_pattern(201, pmem["len"])


def test_hidden_pages_refused_but_reachable_by_device_dma(default_run) -> None:
    d = _checks(default_run[1])["aperture.hidden_refused"]["detail"]
    assert d["map_first_hidden"] == d["map_last_hidden"] == "EACCES"
    assert d["device_dma_into_hidden"] == "OK" and d["round_trip_ok"] is True


def test_bad_descriptors_each_get_their_status(default_run) -> None:
    cases = _checks(default_run[1])["aperture.bad_descriptors"]["detail"]["cases"]
    by_name = {c["case"]: c for c in cases}
    for c in cases:
        if "expected" in c:
            assert c["status"] == c["expected"], c
    assert by_name["dma into the control BAR"]["status"] == "EFAULT"
    assert by_name["dma crossing the NVDIMM end"]["status"] == "ECROSS"
    assert by_name["list with a bad second entry"]["first_entry_untouched"] is True
    assert by_name["256 random descriptors"]["completed"] == 256
    assert by_name["garbage SQ_HEAD"]["flagged"] and by_name["garbage SQ_HEAD"]["alive_after"]


def test_device_memory_persists_across_runs_of_one_run_dir(default_run) -> None:
    """The run dir's device memory is a plain file: what the first run left is there for the next."""
    run_dir = default_run[2]
    assert (run_dir / "devmem0.img").stat().st_size == 256 * MiB
    assert (run_dir / "devmem1.img").stat().st_size == 256 * MiB


@pytest.mark.parametrize("spec,memory,scenario", [
    ("aperture,mem=64M,window=8M,slot=1M,hidden=60M-64M", "512M", "default"),
    ("aperture,mem=64M", "256M", "default"),
    ("aperture,mem=32M,window=16M,slot=2M,hidden=30M-32M", "256M", "aperture"),  # the helper's device checks
    ("aperture,mem=16M,window=16M,slot=2M,hidden=14M-16M", "256M", "driver"),  # the driver on a tiny device
])
def test_small_device_topologies(tmp_path: Path, spec: str, memory: str, scenario: str) -> None:
    """Device sizes other than the default: every check that can run passes, the others say why not."""
    proc = run_aperture("run", "--json", "-q", "--cold", "--device", spec, "--device", spec, "--memory", memory,
                        "--pmem", "64M:fsdax", "--pmem", "64M:devdax", "--append", f"aperture_scenario={scenario}",
                        "--run-dir", str(tmp_path / "run"), timeout=300)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, [c for c in result["checks"] if not c["ok"]]
    names = {c["name"] for c in result["checks"]}
    if scenario != "driver":
        assert {"aperture.window", "aperture.bad_descriptors"} <= names
    if scenario != "aperture":
        assert {"hmm.migrate", "p2p.peer_map", "p2p.pinned_vs_remap"} <= names


def test_guest_ram_above_4g_is_a_dma_target(tmp_path: Path) -> None:
    """3 GiB of guest RAM: the kernel hands the helper pages above 4 GiB, and the DMA engine reaches them."""
    proc = run_aperture("run", "--json", "-q", "--cold", "--memory", "3G", "--run-dir", str(tmp_path / "run"),
                        timeout=300)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, [c for c in result["checks"] if not c["ok"]]
    checks = _checks(result)
    assert checks["p2p.ram_to_device"]["detail"]["list_phys"] >= 4 << 30
    ram_row = next(r for r in checks["zone_device.probe"]["detail"]["rows"] if r["memory"] == "ram")
    assert ram_row["phys_ok"] is True


def test_single_small_device_topology(tmp_path: Path) -> None:
    proc = run_aperture("run", "--json", "-q", "--cold", "--device",
                        "aperture,mem=64M,window=8M,slot=1M,hidden=60M-64M", "--run-dir", str(tmp_path / "run"),
                        timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    result = json.loads(proc.stdout)
    checks = _checks(result)
    assert checks["aperture.window"]["detail"]["devices"][0]["nr_slots"] == 8
    assert "p2p.device_to_device" not in checks  # needs two devices: not run, and said so
    assert any("device_to_device not run" in m for m in result["messages"])
    assert (tmp_path / "run" / "devmem0.img").stat().st_size == 64 * MiB


def test_bad_device_option_is_exit_2() -> None:
    proc = run_aperture("run", "--device", "aperture,window=3M", timeout=60)
    assert proc.returncode == 2 and "power of two" in proc.stderr and "Traceback" not in proc.stderr
