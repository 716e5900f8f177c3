"""Plain, frozen configuration objects, validated once where they are built (the CLI edge)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Label area QEMU puts at the end of each NVDIMM backing file (``label-size``).
NVDIMM_LABEL_SIZE = 128 * KiB
#: ndctl / the kernel's pfn device want namespace data in multiples of this alignment.
NVDIMM_ALIGN = 2 * MiB

PmemMode = Literal["raw", "fsdax", "devdax"]
PMEM_MODES: tuple[str, ...] = ("raw", "fsdax", "devdax")
Accel = Literal["auto", "kvm", "tcg"]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """Parse ``256M``/``1G``/``4096`` (binary units) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    for unit, div in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


@dataclass(frozen=True)
class PmemConfig:
    """One emulated NVDIMM. ``size`` is the data size the guest sees; the file adds the label area."""

    size: int = 256 * MiB
    mode: PmemMode = "raw"

    def __post_init__(self) -> None:
        if self.mode not in PMEM_MODES:
            raise ConfigError(f"invalid pmem mode {self.mode!r}: choose one of {', '.join(PMEM_MODES)}")
        if self.size < 16 * MiB:
            raise ConfigError(f"pmem size {format_size(self.size)} is too small: at least 16M")
        if self.size % NVDIMM_ALIGN:
            raise ConfigError(
                f"pmem size {format_size(self.size)} is not a multiple of 2M "
                "(QEMU and the kernel's pfn devices need size = N x 2M; the 128K label is added for you)"
            )

    @property
    def file_size(self) -> int:
        return self.size + NVDIMM_LABEL_SIZE

    @classmethod
    def parse(cls, text: str) -> PmemConfig:
        """``SIZE[:MODE]``, e.g. ``256M`` or ``512M:devdax``."""
        size_text, _, mode = text.partition(":")
        return cls(size=parse_size(size_text), mode=(mode or "raw"))  # type: ignore[arg-type]


#: The default topology: one NVDIMM in fsdax mode, one in devdax mode.
DEFAULT_PMEM: tuple[PmemConfig, ...] = (PmemConfig(256 * MiB, "fsdax"), PmemConfig(256 * MiB, "devdax"))

#: Size of the plain ivshmem BAR the probe matrix maps (a power of two: QEMU aborts otherwise).
PROBE_BAR_SIZE = 2 * MiB


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to boot one VM. Paths are resolved; sizes are validated."""

    memory: int = 512 * MiB
    pmem: tuple[PmemConfig, ...] = field(default_factory=lambda: DEFAULT_PMEM)
    accel: Accel = "auto"
    boot_timeout: float = 60.0
    run_timeout: float = 120.0
    kernel_cmdline_extra: tuple[str, ...] = ()
    smp: int = 1
    force: bool = False  # let the guest overwrite foreign/mismatched NVDIMM info blocks
    guest_bins: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.memory < 128 * MiB or self.memory % MiB:
            raise ConfigError(f"memory {format_size(self.memory)} must be a whole number of MiB, at least 128M")
        if self.memory > 2 * GiB:
            raise ConfigError("memory above 2G is not supported (guest RAM must stay below the 32-bit hole)")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"invalid accelerator {self.accel!r}: choose auto, kvm or tcg")
        if not 0 < self.boot_timeout <= 3600 or not 0 < self.run_timeout <= 24 * 3600:
            raise ConfigError("timeouts must be positive (boot at most 3600 s)")
        if len(self.pmem) > 8:
            raise ConfigError("at most 8 NVDIMMs")
        for arg in self.kernel_cmdline_extra:
            if not arg or any(c.isspace() for c in arg) or '"' in arg:
                raise ConfigError(f"kernel argument {arg!r} must be one word without quotes")
        for b in self.guest_bins:
            if not b.is_file():
                raise ConfigError(f"--guest-bin {b}: no such file")
        if not 1 <= self.smp <= 8:
            raise ConfigError("smp must be between 1 and 8")


@dataclass(frozen=True)
class KernelSpec:
    """A guest kernel and the directory of its modules (``lib/modules/<release>``)."""

    image: Path
    modules_dir: Path
    release: str
    config_file: Path | None = None
