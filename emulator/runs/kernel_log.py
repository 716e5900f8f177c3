"""``guest.dmesg``: the guest kernel's own reports — WARNING, BUG, Oops, KASAN, KFENCE, lockdep, list corruption,
kmemleak, hung tasks, UBSAN — found in its console log, each with its stack decoded to file:line where the kernel
has debug info (the kernel's own ``scripts/decode_stacktrace.sh``).

The console carries them because the guest boots with ``loglevel=5`` (qemu_argv.kernel_cmdline): every message
of KERN_WARNING and above reaches the serial console, which is a file in the run dir. A report is a finding to
fix, never a line to filter: there is no allow-list.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aperture.emulator.runs.results import Check
from aperture.guest.abi import CheckName
from aperture.guest.kernelspec import KernelSpec

#: The first line of each kind of kernel report, matched at the start of the message (after the printk
#: timestamp): "Speculative Return Stack Overflow: WARNING: ..." is advice, not a WARN splat.
REPORT_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kasan", re.compile(r"BUG: KASAN: ")),
    ("kfence", re.compile(r"BUG: KFENCE: ")),
    ("ubsan", re.compile(r"UBSAN: ")),
    ("lockdep", re.compile(r"WARNING: (possible circular locking dependency|possible recursive locking|"
                           r"inconsistent lock state|suspicious RCU usage|lock held when returning|"
                           r"possible irq lock inversion|bad unlock balance|held lock freed|"
                           r"Nested lock was not taken|.*lock.* detected)")),
    ("list_corruption", re.compile(r"(\S+: )?(list_add|list_del|slab \S+ list_del) corruption")),
    ("kmemleak", re.compile(r"kmemleak: \d+ new suspected memory leaks")),
    ("hung_task", re.compile(r"INFO: task .* blocked for more than \d+ seconds")),
    ("rcu_stall", re.compile(r"rcu: INFO: .* detected stalls")),
    ("oops", re.compile(r"(Oops: |general protection fault|BUG: unable to handle)")),
    ("bug", re.compile(r"(kernel BUG at |BUG: )")),
    ("warning", re.compile(r"WARNING: (CPU: \d+ PID: \d+|at )")),
)
#: Where a report ends (else after MAX_REPORT_LINES lines or at the next report).
_END_TRACE = re.compile(r"---\[ end trace")
_RULE = re.compile(r"=+")
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
MAX_REPORTS = 10
MAX_REPORT_LINES = 80
#: The console log is read from its end, at most this much (a guest can fill it without bound).
MAX_SCAN_BYTES = 8 << 20


@dataclass
class KernelReport:
    kind: str
    header: str
    lines: list[str] = field(default_factory=list)
    decoded: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "header": self.header, "lines": self.lines, "decoded": self.decoded}


def _kind(line: str) -> str | None:
    body = _TIMESTAMP.sub("", line)
    for kind, pattern in REPORT_KINDS:
        if pattern.match(body):
            return kind
    return None


def find_reports(text: str) -> tuple[list[KernelReport], int]:
    """The kernel reports in ``text`` (at most MAX_REPORTS kept) and how many there were in all. A report runs
    from its header to ``---[ end trace``, a closing ``====`` rule (KASAN), the next report, or
    MAX_REPORT_LINES lines."""
    reports: list[KernelReport] = []
    total = 0
    current: KernelReport | None = None
    for line in text.splitlines():
        body = _TIMESTAMP.sub("", line).strip()
        kind = _kind(line)
        if kind is not None:
            total += 1
            current = KernelReport(kind, body, [line]) if len(reports) < MAX_REPORTS else None
            if current is not None:
                reports.append(current)
            continue
        if current is None:
            continue
        current.lines.append(line)
        if (_END_TRACE.search(body) or (_RULE.fullmatch(body) and len(current.lines) > 10)
                or len(current.lines) >= MAX_REPORT_LINES):
            current = None
    return reports, total


def read_console(path: Path) -> tuple[str, int]:
    """The last MAX_SCAN_BYTES of a console log, and the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - MAX_SCAN_BYTES, 0))
            return f.read().decode("utf-8", "replace"), size
    except FileNotFoundError:
        return "", 0


def _module_dir(kernel: KernelSpec, extra: Sequence[Path], into: Path) -> Path:
    """One directory the script can search for any module of the guest's (it takes one): the kernel's own,
    aperture's driver and the user's --module files, as links."""
    from aperture.guest.driver_build import driver_path

    sources = list(kernel.modules_dir.rglob("*.ko")) if kernel.modules_dir else []
    try:
        sources.append(driver_path(kernel))
    except (AssertionError, OSError):
        pass
    for ko in [*sources, *extra]:
        link = into / ko.name
        if ko.is_file() and not link.exists():
            link.symlink_to(ko)
    return into


def decode(report: KernelReport, kernel: KernelSpec, module_dir: Path) -> list[str]:
    """The report's stack with file:line, by the kernel's own scripts/decode_stacktrace.sh against the guest's
    vmlinux and the modules in ``module_dir`` (``_module_dir``); empty when there is no source tree or no debug
    info."""
    source = kernel.build_dir / "source" if kernel.build_dir else None
    script = source / "scripts/decode_stacktrace.sh" if source else None
    vmlinux = kernel.image if kernel.image.name.startswith("vmlinux") else \
        (kernel.build_dir / "vmlinux" if kernel.build_dir else None)
    if script is None or vmlinux is None or not script.is_file() or not vmlinux.is_file() \
            or shutil.which("addr2line") is None:
        return []
    argv = ["bash", str(script), str(vmlinux), str(source), str(module_dir)]
    try:
        proc = subprocess.run(argv, input="\n".join(report.lines), capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, LC_ALL="C"))
    except (OSError, subprocess.TimeoutExpired):
        return []
    out = [ln for ln in proc.stdout.splitlines() if re.search(r"\S+\.[ch]:\d+", ln)]
    return out[:MAX_REPORT_LINES]


def kernel_log_check(console: Path, kernel: KernelSpec, modules: Sequence[Path] = ()) -> Check:
    """``guest.dmesg``: ok when the guest kernel reported nothing; each report (and its decoded stack) in the
    detail. ``modules``: the user's own (--module), for decoding."""
    text, size = read_console(console)
    reports, total = find_reports(text)
    if reports:
        with tempfile.TemporaryDirectory(prefix="aperture-decode-") as tmp:
            module_dir = _module_dir(kernel, modules, Path(tmp))
            for report in reports:
                report.decoded = decode(report, kernel, module_dir)
    detail: dict[str, Any] = {"reports": [r.to_json() for r in reports], "count": total,
                              "kinds": sorted({r.kind for r in reports}), "console": str(console),
                              "scanned_bytes": min(size, MAX_SCAN_BYTES), "console_bytes": size}
    return Check(CheckName.GUEST_DMESG, total == 0, detail)
