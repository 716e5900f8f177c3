"""Facts about other processes, read from /proc (no signals sent)."""

from __future__ import annotations

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
