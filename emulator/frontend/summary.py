"""Human-readable output: the run summary (a line per check, from the check table; the probe table) and bench
reports."""

from __future__ import annotations

import json
from typing import Any

import click
from aperture.emulator.runs.results import summary_line
from aperture.guest.abi import CheckName


def print_probe_table(detail: Any) -> None:
    rows = detail.get("rows") if isinstance(detail, dict) else None
    if not rows:
        return
    click.echo(f"       {'memory':<8} {'O_DIRECT':<9} {'expected':<9} {'physical':<14} note")
    for r in rows:
        phys = int(r.get("phys") or 0)
        note = r.get("why") or ("" if r.get("phys_ok") in (True, None) else "address does not match QMP")
        click.echo(f"       {str(r.get('memory')):<8} {str(r.get('result')):<9} {str(r.get('expected')):<9} "
                   f"{(hex(phys) if phys else '-'):<14} {note}")


def print_summary(result: Any) -> None:
    passed = sum(c.status == "pass" for c in result.checks)
    skipped = sum(c.status == "skip" for c in result.checks)
    verdict = click.style("PASS", fg="green", bold=True) if result.ok else click.style("FAIL", fg="red", bold=True)
    counts = f"{passed}/{len(result.checks)} checks" + (f", {skipped} skipped" if skipped else "")
    click.echo(f"aperture run: {verdict} ({counts}) on {result.accel}, "
               f"QEMU {result.qemu_version}, kernel {result.kernel_release}")
    click.echo(f"  boot: helper reported {result.boot_s:.2f} s after QEMU start; "
               f"powered off at {result.poweroff_s:.2f} s")
    width = max(len(c.name) for c in result.checks)
    for c in result.checks:
        mark = {"pass": click.style("ok  ", fg="green"), "skip": click.style("skip", fg="yellow"),
                "fail": click.style("FAIL", fg="red")}[c.status]
        click.echo(f"  {mark} {c.name:<{width}}  {summary_line(c.name, c.detail)}")
        if c.name == CheckName.ZONE_DEVICE_PROBE:
            print_probe_table(c.detail)
    for note in result.messages:
        click.echo(f"  note: {note}")
    click.echo(f"  run dir: {result.run_dir} (console.log, results.jsonl, pmem*.img, devmem*.img, nvme0.img)")


def print_bench(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report))
        return
    for group in ("figures", "ratios"):
        click.echo(click.style(group, bold=True))
        for k, v in report[group].items():
            click.echo(f"  {k:<34} {v}")
    for note in report.get("notes", []):
        click.echo(f"  note: {note}")
