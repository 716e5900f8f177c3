"""QEMU's option syntax: values inside ``key=value,key=value`` options."""

from __future__ import annotations

from pathlib import Path


def opt_value(value: str | Path) -> str:
    """A value as QEMU's option parser reads it back: a comma is written as two (``/tmp/a,b`` → ``/tmp/a,,b``),
    so a path can never smuggle in another option (``…,share=off``). Newlines and NULs cannot be quoted."""
    text = str(value)
    if "\n" in text or "\0" in text:
        from .errors import ConfigError

        raise ConfigError(f"{text!r}: a QEMU option value cannot hold a newline or NUL")
    return text.replace(",", ",,")
