"""The guest kernel driver (guest/driver/) in a real guest: device-private memory, the window as P2P memory,
"map this page for a peer", pins against host remaps, unloading. One default boot serves every test here."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from aperture.guest import abi
from aperture.guest.driver_build import build_driver, driver_sources
from aperture.guest.errors import SetupError

from tests.conftest import checks_by_name

DRIVER_CHECKS = ("zone_device.window", "hmm.migrate", "hmm.fault_back", "p2p.peer_map", "p2p.peer_map_hidden",
                 "p2p.pinned_vs_remap", "driver.unload")


def _device_bytes_on_disk(run_dir: Path, claims: list[dict[str, Any]]) -> bool:
    """Read the bytes the guest says are in device memory straight from the device-memory files."""
    for c in claims:
        with open(run_dir / f"devmem{c['device']}.img", "rb") as f:
            f.seek(c["offset"])
            if f.read(c["len"]) != abi.pattern(c["seed"], c["start"] + c["len"])[c["start"]:]:
                return False
    return bool(claims)


def test_every_driver_check_passes_with_the_hosts_verification(default_run) -> None:
    checks = checks_by_name(default_run[1])
    for name in DRIVER_CHECKS:
        assert checks[name]["ok"], checks[name]
        assert "skip_reason" not in checks[name]["detail"]


def test_the_window_row_reads_ok_beside_the_raw_bar_row(default_run) -> None:
    d = checks_by_name(default_run[1])["zone_device.window"]["detail"]
    assert d["result"] == "ok" and d["data_ok"] and d["bar_row"] == "EFAULT"
    bar, size = d["qmp_window_bar"]
    assert bar <= d["bus_addr"] < bar + size and d["bus_addr_in_window_bar"]


def test_64_mib_migrated_by_device_dma_is_in_the_device_memory_file(default_run) -> None:
    _, result, run_dir = default_run
    d = checks_by_name(result)["hmm.migrate"]["detail"]
    assert d["migrated"] == d["pages"] == 16384 and d["bytes_to_device"] == 64 << 20
    assert sum(c["len"] for c in d["device_bytes"]) == 64 << 20
    assert _device_bytes_on_disk(run_dir, d["device_bytes"])  # read again here, not just the host's word
    assert 0 < d["migrate_vs_host_memcpy"] < 1 and d["host_memcpy_mb_s"] > 0


def test_fault_back_is_counted_per_page(default_run) -> None:
    d = checks_by_name(default_run[1])["hmm.fault_back"]["detail"]
    assert d["intact"] and d["pages_to_ram"] == d["migrated"] == 2048 and d["bytes_to_ram"] == 8 << 20
    assert d["faults"] >= 2048


def test_peer_map_round_trips_through_nvme_and_the_other_device(default_run) -> None:
    _, result, run_dir = default_run
    d = checks_by_name(result)["p2p.peer_map"]["detail"]
    assert d["nvme_round_trip_ok"] and d["cpu_fault_back_ok"] and d["device_dma"] == "ok"
    assert _device_bytes_on_disk(run_dir, d["device_bytes"])
    lat = d["latency"]
    assert lat["rounds"] == 200 and lat["evictions"] > 0 and 0 < lat["map_us_p50"] <= lat["map_us_p99"]


def test_hidden_pages_hold_data_but_are_never_exposed(default_run) -> None:
    d = checks_by_name(default_run[1])["p2p.peer_map_hidden"]["detail"]
    assert d["peer_map"] == "EACCES" and d["fault_back_intact"]
    assert d["hidden_start"] <= d["dev_offset"] < d["hidden_end"]


def test_pinned_slots_take_nvme_dma_while_the_host_remaps_around_them(default_run) -> None:
    _, result, run_dir = default_run
    d = checks_by_name(result)["p2p.pinned_vs_remap"]["detail"]
    remaps = d["host_remaps"]
    assert d["rounds"] > 0 and d["bad_pages"] == 0 and d["io_errors"] == 0
    assert remaps["remaps"] > 0 and remaps["remaps_with_pins"] > 0 and not remaps["errors"]
    assert remaps["latency_ms_p50"] is not None and remaps["latency_ms_p99"] is not None
    assert _device_bytes_on_disk(run_dir, d["device_bytes"])


def test_rmmod_is_refused_while_pinned_and_works_when_not(default_run) -> None:
    d = checks_by_name(default_run[1])["driver.unload"]["detail"]
    assert d["pinned"]["rmmod"] in ("EAGAIN", "EBUSY")
    assert d["unpinned"]["rmmod"] == "ok" and d["unpinned"]["driver_gone"] and d["reloaded"]
    assert d["unbind_with_file_open"] == {"file_after": "ENODEV", "page_back_intact": True}


def test_the_driver_builds_with_w1_and_a_warning_fails_the_build(tmp_path: Path, built_kernel) -> None:
    """No VM: the module against the built kernel's tree, and a copy with one warning in it."""
    assert build_driver(built_kernel, cache=tmp_path / "ok").name == "aperture_drv.ko"
    src = tmp_path / "pkg"
    (src / "driver").mkdir(parents=True)
    (src / "helper").mkdir()
    for p in driver_sources():
        shutil.copy2(p, src / p.parent.name / p.name)
    drv = src / "driver" / "aperture_drv.c"
    drv.write_text(drv.read_text() + "\nstatic int apdrv_unused_for_the_test(void)\n{\n\tint x;\n\treturn 0;\n}\n")
    import aperture.guest.driver_build as db

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(db, "driver_sources", lambda: [src / p.parent.name / p.name for p in driver_sources()])
        with pytest.raises(SetupError, match="W=1"):
            db.build_driver(built_kernel, cache=tmp_path / "bad")
