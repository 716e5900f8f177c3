"""Facts about other processes, read from /proc, and the tie that kills QEMU with its owner."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may itself hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """A process runs (a zombie, e.g. one nobody reaps after SIGKILL, counts as dead)."""
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] != "Z"


def parent_pid(pid: int) -> int:
    """The parent of ``pid``, or -1 if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields and len(fields) > 1 else -1


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: QEMU gets SIGKILL when the process that owns its device model dies (even by
    SIGKILL), so it never runs on with nobody serving its devices. (QEMU's own ``-run-with exit-with-parent``
    is not in every build.)"""

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the owner died between fork and prctl
            os._exit(1)

    return arm
