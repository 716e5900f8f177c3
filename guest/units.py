"""Sizes and durations as people write them (``256M``, ``0x3000000``, ``20ms``): parsed once, at the edge."""

from __future__ import annotations

import re

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """Parse ``256M``/``1G``/``4096``/``0x3000000`` (binary units; hex as kernel and QEMU command lines write
    it) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r}: expected a number (decimal or 0x hex) with an optional K/M/G/T "
                          "suffix")
    return int(m.group(1), 0) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    for unit, div in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration(text: str) -> float:
    """``20ms``, ``1.5s``, ``2m`` or plain seconds → seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 20ms, 10s, 2m")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
