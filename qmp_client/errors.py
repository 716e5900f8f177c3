"""The QMP layer's errors (part of the one tree rooted in guest/errors.py)."""

from __future__ import annotations

from aperture.guest.errors import GuestError


class QmpError(GuestError):
    """A QMP command failed. ``error_class`` is QEMU's (``GenericError``, ``DeviceNotFound``, ...) when QEMU
    answered with an error, else None."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class


class QemuGone(QmpError):
    """The QMP connection is lost or was never made: QEMU has exited (or was killed)."""
