"""Saving and loading a VM's state through QMP migration to a file (``mapped-ram``: RAM pages at fixed
offsets, zero pages left as holes), the mechanism under warm starts."""

from __future__ import annotations

import time
from pathlib import Path

from aperture.qmp_client.errors import QmpError

from .session import SyncQmpSession

#: Migration capabilities both sides must agree on.
CAPABILITIES = ({"capability": "mapped-ram", "state": True},)


def _uri(path: Path) -> str:
    return f"file:{path}"


def _wait(qmp: SyncQmpSession, what: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.execute("query-migrate")
        status = str(info.get("status", ""))
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            raise QmpError(f"{what} {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise QmpError(f"{what} did not finish in {timeout:.0f} s (status {status or 'none'})")
        time.sleep(0.005)


def save_state(qmp: SyncQmpSession, path: Path, timeout: float = 120.0) -> float:
    """Stop the VM and write its whole state to ``path``; returns seconds. The VM stays stopped."""
    t0 = time.monotonic()
    qmp.stop()
    qmp.execute("migrate-set-capabilities", {"capabilities": list(CAPABILITIES)})
    qmp.execute("migrate", {"uri": _uri(path)})
    _wait(qmp, "saving the VM state", timeout)
    return time.monotonic() - t0


def load_state(qmp: SyncQmpSession, path: Path, timeout: float = 60.0) -> float:
    """Load ``path`` into a QEMU started with ``-incoming defer`` (and ``-S``); returns seconds. The caller
    resumes it (``cont``)."""
    t0 = time.monotonic()
    qmp.execute("migrate-set-capabilities", {"capabilities": list(CAPABILITIES)})
    qmp.execute("migrate-incoming", {"uri": _uri(path)})
    _wait(qmp, "loading the VM state", timeout)
    return time.monotonic() - t0
