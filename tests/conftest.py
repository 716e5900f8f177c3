"""Markers by folder: tests/unit → ``unit`` (seconds, no VM); tests/integration and tests/reliability → ``vm``
(they boot QEMU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts or "reliability" in parts:
            item.add_marker(pytest.mark.vm)


def aperture_argv() -> list[str]:
    exe = Path(sys.executable).parent / "aperture"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "aperture.emulator"]


def interruptible() -> None:
    """preexec_fn for a child a test sends SIGINT to: Ctrl-C's default action, whatever this process inherited (a
    background job of a non-interactive shell starts with SIGINT ignored, and so would the child)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_aperture(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
                 cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(aperture_argv() + list(args), capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd, input=input if input is not None else "")


def checks_by_name(result: dict) -> dict[str, dict]:
    """The checks of an `aperture run --json` result, by name."""
    return {c["name"]: c for c in result["checks"]}


@pytest.fixture(scope="session")
def debian_kernel():
    """Debian's prebuilt kernel (scripts/setup.sh fetches it); its absence is a setup failure, not a skip."""
    from aperture.guest.kernel import resolve_kernel

    return resolve_kernel("debian")


@pytest.fixture(scope="session")
def built_kernel():
    """The kernel `aperture kernel build` made (scripts/setup.sh builds it): the default guest kernel."""
    from aperture.guest.kernel import resolve_kernel

    return resolve_kernel()


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes whose argv mentions ``marker`` (read from /proc: no procps needed)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            line = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in line:
            found.append(line)
    return found


def qemu_processes(marker: str) -> list[str]:
    """Command lines of live QEMU processes whose argv mentions ``marker`` (read from /proc, untruncated)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = " ".join(a.decode(errors="replace") for a in argv)
        if argv and b"qemu-system" in argv[0] and marker in line:
            found.append(line)
    return found
