"""guest.dmesg: the guest kernel's own reports found in its console log, whole and bounded; a clean boot passes."""

from pathlib import Path

from aperture.emulator.runs.kernel_log import MAX_REPORTS, find_reports, kernel_log_check
from aperture.guest.kernelspec import KernelSpec

CLEAN = """tsc: Unable to calibrate against PIT
aperture_drv: loading out-of-tree module taints kernel.
aperture: helper starting at 1.20s
reboot: Power down
"""

LOCKDEP = """[    5.120000] ======================================================
[    5.120001] WARNING: possible circular locking dependency detected
[    5.120002] 6.12.118 #1 Tainted: G           O
[    5.120003] ------------------------------------------------------
[    5.120004] aperture-helper/123 is trying to acquire lock:
[    5.120005] ffff888003c1e0a8 (&mm->mmap_lock){++++}-{3:3}, at: __might_fault+0x3a/0x80
[    5.120006]
[    5.120007] but task is already holding lock:
[    5.120008] ffff888004a2c130 (&ad->gone_lock){++++}-{3:3}, at: apdrv_ioctl+0x52/0x1a0 [aperture_drv]
[    5.120009] Call Trace:
[    5.120010]  <TASK>
[    5.120011]  dump_stack_lvl+0x5d/0x80
[    5.120012]  apdrv_ioctl+0x52/0x1a0 [aperture_drv]
[    5.120013]  </TASK>
aperture: helper exited with status 0
"""

KASAN = """==================================================================
BUG: KASAN: slab-use-after-free in uaf_init+0x3c/0x60 [uaf]
Read of size 1 at addr ffff888003a7d000 by task insmod/140

CPU: 0 UID: 0 PID: 140 Comm: insmod Tainted: G           O       6.12.118 #1
Call Trace:
 <TASK>
 kasan_report+0x92/0xc0
 uaf_init+0x3c/0x60 [uaf]
 do_one_initcall+0x8e/0x2c0
 </TASK>

Freed by task 140:
 kfree+0x10/0x20
==================================================================
Disabling lock debugging due to kernel taint
"""

WARN = """------------[ cut here ]------------
WARNING: CPU: 0 PID: 1 at mm/memremap.c:160 memunmap_pages+0x12/0x40
Modules linked in: aperture_drv(O)
Call Trace:
 memunmap_pages+0x12/0x40
---[ end trace 0000000000000000 ]---
aperture: helper exited with status 0
"""


def test_a_clean_boot_has_no_reports() -> None:
    assert find_reports(CLEAN) == ([], 0)


def test_lockdep_report_is_one_report_with_its_stack() -> None:
    reports, total = find_reports(CLEAN + LOCKDEP)
    assert total == 1 and reports[0].kind == "lockdep"
    assert reports[0].header == "WARNING: possible circular locking dependency detected"
    assert any("apdrv_ioctl+0x52/0x1a0 [aperture_drv]" in ln for ln in reports[0].lines)


def test_kasan_and_warn_reports_end_where_they_end() -> None:
    reports, total = find_reports(KASAN + WARN)
    assert total == 2 and [r.kind for r in reports] == ["kasan", "warning"]
    assert reports[0].header.startswith("BUG: KASAN: slab-use-after-free in uaf_init")
    assert "Disabling lock debugging" not in "\n".join(reports[0].lines)  # ended at the closing rule
    assert reports[1].lines[-1].startswith("---[ end trace")


def test_reports_are_bounded() -> None:
    reports, total = find_reports(WARN * (MAX_REPORTS + 5) + "x\n" * 10_000)
    assert total == MAX_REPORTS + 5 and len(reports) == MAX_REPORTS
    assert all(len(r.lines) <= 80 for r in reports)


def test_check_fails_on_a_report_and_passes_on_a_clean_log(tmp_path: Path) -> None:
    kernel = KernelSpec(tmp_path / "bzImage", None, "6.12")
    console = tmp_path / "console.log"
    console.write_text(CLEAN)
    clean = kernel_log_check(console, kernel)
    assert clean.ok and clean.status == "pass" and clean.name == "guest.dmesg"
    console.write_text(CLEAN + LOCKDEP)
    bad = kernel_log_check(console, kernel)
    assert not bad.ok and bad.detail["kinds"] == ["lockdep"] and bad.detail["count"] == 1
    assert kernel_log_check(tmp_path / "missing.log", kernel).ok  # no console yet: nothing reported


def test_advice_that_says_warning_is_not_a_report() -> None:
    """Seen on Debian's kernel under TCG: a mitigation notice with "WARNING:" inside the line is no WARN splat."""
    advice = ("[    0.277227] Speculative Return Stack Overflow: WARNING: See "
              "https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html for mitigation options.\n")
    assert find_reports(CLEAN + advice) == ([], 0)
    assert find_reports(advice + WARN)[1] == 1


def test_the_guest_cannot_report_the_hosts_own_checks() -> None:
    from aperture.emulator.runs.results import Check

    assert Check.from_message({"type": "check", "name": "guest.dmesg", "ok": True, "detail": {}}) is None
    assert Check.from_message({"type": "check", "name": "host.emulator_thread", "ok": True}) is None
    assert Check.from_message({"type": "check", "name": "dax.fsdax", "ok": True}) is not None
