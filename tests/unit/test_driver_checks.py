"""The host's side of the guest driver's checks: absent exactly when there is no driver, device bytes found in
the device-memory file, window addresses inside the window BAR, the remap controller's figures merged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aperture.emulator.runs.results import Check, HostVerifier, host_memcpy_mb_s, pinned_vs_remap
from aperture.emulator.runs.run import phase_period
from aperture.guest import abi
from aperture.guest.abi import CheckName
from aperture.qmp_client.qemu import win_id
from aperture.qmp_client.remap import RemapStats
from aperture.qmp_client.session import PciDevice


def _verifier(tmp_path: Path, driver: bool = True, nvme: bool = True) -> HostVerifier:
    devmem = tmp_path / "devmem1.img"
    devmem.write_bytes(bytes(1 << 20))
    with open(devmem, "r+b") as f:
        f.seek(0x3000)
        f.write(abi.pattern(9, 0x5000)[0x1000:])  # bytes [0x1000, 0x5000) of seed 9's pattern
    window = PciDevice(qdev_id=win_id(1), bus=0, slot=0x13, function=0, vendor=0x1AF4, device=0x1110,
                       bars={2: (0xFC000000, 16 << 20)})
    return HostVerifier(devices=[], pci=[window], pmem_files=[], pmem_modes=[], kconfig={}, memory=512 << 20,
                        probe_bar_id="probe", devmem_files=[tmp_path / "devmem0.img", devmem],
                        nvme_file=tmp_path / "nvme.img" if nvme else None, driver_in_image=driver)


def _bytes(offset: int = 0x3000, length: int = 0x4000, seed: int = 9, start: int = 0x1000) -> dict[str, int]:
    return {"device": 1, "offset": offset, "len": length, "seed": seed, "start": start}


def test_device_bytes_are_read_from_the_device_memory_file(tmp_path: Path) -> None:
    v = _verifier(tmp_path)
    assert v.verify_claims([_bytes()], lambda c: True) == (1, 0, [])
    wrong = [_bytes(seed=10), _bytes(offset=0x8000, start=0), {"device": 7, "offset": 0, "len": 1}]
    verified, superseded, bad = v.verify_claims(wrong, lambda c: True)
    assert (verified, superseded, len(bad)) == (0, 0, 3) and bad[0]["why"] == "malformed record"


def test_a_later_claim_supersedes_an_earlier_one_whoever_made_it(tmp_path: Path) -> None:
    """The helper wrote a region, the driver's migration later reused that device memory: the helper's claim
    is superseded (not a mismatch), and the driver's is checked."""
    v = _verifier(tmp_path)
    helper = {"device": 1, "offset": 0x3000, "len": 0x1000, "seed": 77}
    driver = dict(_bytes(), check=CheckName.HMM_MIGRATE)
    window = v.verify(Check(CheckName.APERTURE_WINDOW, True, {}), [helper, driver])
    assert window.ok and window.detail["host_superseded"] == 1 and window.detail["host_verified_regions"] == 0
    migrate = v.verify(Check(CheckName.HMM_MIGRATE, True, {"device_bytes": [_bytes()]}), [helper, driver])
    assert migrate.ok and migrate.detail["host_verified_regions"] == 1
    stale = v.verify(Check(CheckName.APERTURE_WINDOW, True, {}), [dict(helper, offset=0x8000)])
    assert not stale.ok and stale.detail["host_mismatches"]
    # Memory the helper handed to the driver (bound it) supersedes its earlier claims there, and is never
    # compared itself.
    released = {"device": 1, "offset": 0, "len": 1 << 20, "released": True}
    handed = v.verify(Check(CheckName.APERTURE_WINDOW, True, {}), [dict(helper, offset=0x8000), released])
    assert handed.ok and handed.detail["host_superseded"] == 1 and not handed.detail["host_mismatches"]


def test_the_window_row_needs_its_address_inside_the_window_bar(tmp_path: Path) -> None:
    v = _verifier(tmp_path)
    detail: dict[str, Any] = {"row": "window", "result": "ok", "device": 1, "bus_addr": 0xFC200000,
                              "device_bytes": [_bytes()]}
    checked = v.verify(Check(CheckName.ZONE_DEVICE_WINDOW, True, detail))
    assert checked.ok and checked.detail["bus_addr_in_window_bar"] and checked.detail["host_verified_regions"] == 1
    outside = v.verify(Check(CheckName.ZONE_DEVICE_WINDOW, True, dict(detail, bus_addr=0xFE000000)))
    assert not outside.ok
    wrong_bytes = v.verify(Check(CheckName.P2P_PEER_MAP, True, {"device_bytes": [_bytes(seed=3)]}))
    assert not wrong_bytes.ok and wrong_bytes.detail["host_mismatches"]


@pytest.mark.parametrize("driver,nvme,name,expected_absent", [
    (False, True, CheckName.HMM_MIGRATE, True),
    (True, False, CheckName.P2P_PEER_MAP, True),
    (True, False, CheckName.HMM_FAULT_BACK, False),
    (True, True, CheckName.DRIVER_UNLOAD, False),
])
def test_driver_checks_are_absent_exactly_without_a_driver_or_peer(tmp_path: Path, driver: bool, nvme: bool,
                                                                   name: str, expected_absent: bool) -> None:
    v = _verifier(tmp_path, driver=driver, nvme=nvme)
    absent = v.verify(Check(name, False, {"result": "absent", "why": "no /sys/bus/pci/drivers/aperture"}))
    assert absent.ok is expected_absent
    if not expected_absent:  # a driver that is there must not report itself absent
        assert absent.detail["expected"] == "present"


def test_migration_is_compared_with_the_hosts_memcpy(tmp_path: Path) -> None:
    v = _verifier(tmp_path)
    checked = v.verify(Check(CheckName.HMM_MIGRATE, True, {"bytes": 4 << 20, "mb_s": 100.0,
                                                             "device_bytes": [_bytes()]}))
    assert checked.ok and checked.detail["host_memcpy_mb_s"] > 100
    assert 0 < checked.detail["migrate_vs_host_memcpy"] < 1
    assert host_memcpy_mb_s(0) is None and host_memcpy_mb_s(1 << 40) is None


def test_pinned_vs_remap_needs_host_remaps() -> None:
    guest = Check(CheckName.P2P_PINNED_VS_REMAP, True, {"rounds": 10, "bad_pages": 0})
    assert not pinned_vs_remap(guest, None).ok  # no remap controller ran: nothing was shown
    stats = RemapStats("pause", remaps=40, slots_moved=50, remaps_with_pins=20)
    merged = pinned_vs_remap(guest, stats)
    assert merged.ok and merged.detail["host_remaps"]["remaps_with_pins"] == 20
    stats.errors.append("QMP went away")
    assert not pinned_vs_remap(guest, stats).ok


def test_a_guest_names_the_remap_period_within_bounds() -> None:
    assert phase_period({"every_ms": 5}) == 0.005
    assert phase_period({}) == 0.005
    assert phase_period({"every_ms": 0}) == 0.001 and phase_period({"every_ms": 1e9}) == 1.0
    assert phase_period({"every_ms": "fast"}) == 0.005 and phase_period({"every_ms": True}) == 0.005


def test_the_driver_is_built_only_against_the_tree_of_the_kernel_it_loads_into(tmp_path: Path) -> None:
    from aperture.guest.driver_build import driver_missing
    from aperture.guest.kernelspec import KernelSpec

    config = tmp_path / "config"
    config.write_text("CONFIG_MODULES=y\n")
    tree = tmp_path / "obj"
    tree.mkdir()
    cache = tmp_path / "cache"
    user = KernelSpec(tmp_path / "vmlinux", None, "6.12.0", config, "user")
    assert "aperture kernel build" in (driver_missing(user, cache) or "")
    built = KernelSpec(tmp_path / "vmlinux", None, "6.12.0", config, "built", build_dir=tree)
    assert "is gone" in (driver_missing(built, cache) or "")
    (tree / ".config").write_text("CONFIG_MODULES=y\nCONFIG_OTHER=y\n")
    assert "another configuration" in (driver_missing(built, cache) or "")
    (tree / ".config").write_text("CONFIG_MODULES=y\n")
    assert driver_missing(built, cache) is None
    from aperture.guest.driver_build import driver_path

    (tree / ".config").unlink()  # a CI cache without the tree: a cached driver is still used
    driver_path(built, cache).parent.mkdir(parents=True)
    driver_path(built, cache).write_bytes(b"\x7fELF")
    assert driver_missing(built, cache) is None
    assert KernelSpec.from_dict(built.to_dict()) == built


def test_the_snapshot_key_covers_what_the_command_line_does_not_show(tmp_path: Path) -> None:
    """Device memory size and hidden ranges live in control memory, not on QEMU's command line: two VMs that
    differ only there must never share a snapshot (a restore would bring the other's control memory)."""
    from aperture.emulator.config import DeviceConfig, VmConfig
    from aperture.emulator.vm.snapshots import snapshot_key
    from aperture.guest.kernelspec import KernelSpec

    kernel_file = tmp_path / "vmlinux"
    kernel_file.write_bytes(b"\x7fELF")
    kernel = KernelSpec(kernel_file, None, "6.12", None, "built")
    small = VmConfig(devices=(DeviceConfig(mem=16 << 20, window=16 << 20, slot=2 << 20, hidden=()),))
    bigger = VmConfig(devices=(DeviceConfig(mem=32 << 20, window=16 << 20, slot=2 << 20, hidden=()),))
    keys = {snapshot_key(c, kernel, "img", "qemu", "10.0.2", "tcg").key for c in (small, bigger)}
    assert len(keys) == 2
    again = snapshot_key(small, kernel, "img", "qemu", "10.0.2", "tcg")
    assert again.key == snapshot_key(small, kernel, "img", "qemu", "10.0.2", "tcg").key
    assert again.key != snapshot_key(small, kernel, "img", "qemu", "10.0.2", "kvm").key  # per accelerator


def test_a_save_killed_midway_is_removed_by_the_next_lookup(tmp_path: Path) -> None:
    """kill -9 while a snapshot is written leaves its private directory; the next run's lookup removes it (a
    live saver's is kept)."""
    import os

    from aperture.emulator.vm.snapshots import SnapshotKey, find_snapshot

    base = tmp_path / "snapshots"
    dead = base / ".abc.999999999.1.tmp"
    live = base / f".abc.{os.getpid()}.2.tmp"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "state.mig").write_bytes(b"x")
    assert find_snapshot(SnapshotKey("abc", {}), tmp_path) == (None, None)
    assert not dead.exists() and live.exists()
