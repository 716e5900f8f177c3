"""One error tree for every layer (its root lives in the lowest one); each class carries the exit code it means.
Errors that belong to one layer live in it and derive from these: ``QmpError``/``QemuGone`` in
qmp_client/errors.py, ``ControlRefused`` in emulator/daemon/control.py.

Exit codes mean one thing each (README's table is the truth): 1 a check failed (not an error class: the run's
verdict), 2 bad usage or configuration, 3 the environment lacks something, 4 the guest or QEMU misbehaved,
70 an internal error (a bug), 130 interrupted.
"""

from __future__ import annotations


class ApertureError(Exception):
    """Base of every error aperture raises on purpose. ``exit_code`` is what the CLI exits with; raise a
    subclass: the base itself has no category, so it exits 70 like any other bug."""

    exit_code = 70

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def one_line(self) -> str:
        return " ".join(self.message.split())


class ConfigError(ApertureError):
    """Bad user input: sizes, paths, option combinations (exit 2)."""

    exit_code = 2


class SetupError(ApertureError):
    """The environment lacks something: QEMU, a kernel, its modules, a compiler (exit 3)."""

    exit_code = 3


class GuestError(ApertureError):
    """The guest or QEMU misbehaved: panic, timeout, QEMU died (exit 4)."""

    exit_code = 4


class VmLaunchError(GuestError):
    """QEMU exited or failed; carries what is needed to debug it, like QEMUMachine's launch errors."""

    def __init__(self, message: str, *, exit_code: int | None, argv: list[str], output_tail: str) -> None:
        super().__init__(message)
        self.qemu_exit_code = exit_code
        self.argv = argv
        self.output_tail = output_tail

    def details(self) -> str:
        return (
            f"QEMU exit code: {self.qemu_exit_code}\n"
            f"command line: {' '.join(self.argv)}\n"
            f"--- output tail ---\n{self.output_tail}"
        )


class DaemonGone(GuestError):
    """The VM daemon's control socket is unreachable or closed without a reply: the VM has stopped."""
