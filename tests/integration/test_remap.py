"""Host-driven remaps while the guest works: pause mode is transparent; the checks catch a broken remap."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import checks_by_name as _checks
from tests.conftest import run_aperture


def test_pause_mode_remaps_are_transparent(tmp_path: Path) -> None:
    proc = run_aperture("run", "--remap-every", "20ms", "--duration", "6s", "--json", "-q",
                        "--run-dir", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    checks = _checks(json.loads(proc.stdout))
    consistency = checks["remap.consistency"]["detail"]
    assert checks["remap.consistency"]["ok"] and checks["remap.integrity"]["ok"]
    assert consistency["mode"] == "pause"
    assert consistency["remaps"] >= 100  # "hundreds" over a default 10 s run
    assert consistency["violations"] == 0 and consistency["reads"] > 1000 and consistency["writes"] > 100
    assert consistency["latency_ms_p50"] > 0
    assert consistency["generation_changes_seen"] > 0  # the guest really saw the table move
    assert checks["remap.integrity"]["detail"]["pages_checked"] > 10


def test_hotplug_mode_replugs_windows_and_the_guest_follows(tmp_path: Path) -> None:
    proc = run_aperture("run", "--remap-every", "300ms", "--remap-mode", "hotplug", "--duration", "4s", "--json",
                        "-q", "--run-dir", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    checks = _checks(json.loads(proc.stdout))
    hotplug = checks["remap.hotplug"]["detail"]
    assert checks["remap.hotplug"]["ok"] and checks["remap.consistency"]["ok"] and checks["remap.integrity"]["ok"]
    assert hotplug["remaps"] >= 5 and hotplug["guest_reprobes"] >= 4 and hotplug["guest_reprobe_failures"] == 0
    assert 0 < hotplug["device_deleted_ms_p50"] < 2000  # ACPI hotplug, not native pciehp's 5 s
    assert checks["remap.consistency"]["detail"]["violations"] == 0


def test_remaps_on_a_crowded_device_in_a_small_guest(tmp_path: Path) -> None:
    """Fewer exposable pages than slots, and a 256 MiB guest (memory pressure: DMA buffers must not migrate)."""
    proc = run_aperture("run", "--remap-every", "20ms", "--duration", "4s", "--json", "-q", "--memory", "256M",
                        "--device", "aperture,mem=16M,window=16M,slot=2M,hidden=14M-16M",
                        "--run-dir", str(tmp_path / "run"), timeout=300)
    checks = _checks(json.loads(proc.stdout))
    assert proc.returncode == 0, checks
    assert checks["remap.consistency"]["detail"]["violations"] == 0
    assert checks["remap.consistency"]["detail"]["errors"] == []


def test_unsafe_remaps_are_caught(tmp_path: Path) -> None:
    """Negative control: retargeting without pausing and without the seqlock must produce violations."""
    proc = run_aperture("run", "--remap-every", "2ms", "--duration", "4s", "--json", "-q",
                        "--run-dir", str(tmp_path / "run"), env={"APERTURE_REMAP_MODE": "unsafe"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    consistency = _checks(json.loads(proc.stdout))["remap.consistency"]
    assert not consistency["ok"]
    assert consistency["detail"]["violations"] > 0
    assert "shows page" in consistency["detail"]["first_violation"]


def test_remap_option_validation() -> None:
    for args, text in ((["--remap-every", "fast"], "invalid duration"),
                       (["--remap-every", "0ms"], "between 1ms"),
                       (["--remap-every", "20ms", "--device", "none"], "need at least one aperture device"),
                       (["--remap-every", "20ms", "--reboot"], "cannot be combined")):
        proc = run_aperture("run", *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert text in proc.stderr and "Traceback" not in proc.stderr
