"""Run results: checks from the guest, host-side verification, and the JSON contract of ``aperture run``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qmp_client.session import MemoryDevice


@dataclass
class Check:
    name: str
    ok: bool
    detail: Any = None


@dataclass
class RunResult:
    ok: bool
    accel: str
    accel_reason: str
    qemu_version: str
    kernel_release: str
    boot_s: float | None
    poweroff_s: float | None
    run_dir: str
    checks: list[Check] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def verify_nvdimm(check: Check, devices: list[MemoryDevice]) -> Check:
    """Host side of ``nvdimm.present``: the guest's regions must be exactly QMP's NVDIMMs."""
    expected = sorted((d.addr, d.size) for d in devices if d.kind == "nvdimm")
    detail = check.detail if isinstance(check.detail, dict) else {}
    regions = detail.get("regions") if isinstance(detail.get("regions"), list) else []
    seen = sorted((int(r.get("addr", -1)), int(r.get("size", -1))) for r in regions if isinstance(r, dict))
    matches = seen == expected
    detail = dict(detail, qmp=[{"addr": a, "size": s} for a, s in expected], matches_qmp=matches)
    return Check(check.name, bool(check.ok and matches and expected), detail)
