"""Plain, frozen configuration objects, validated once where they are built (the CLI edge)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aperture.guest import abi
from aperture.guest.errors import ConfigError
from aperture.guest.units import GiB, KiB, MiB, format_size, parse_size

#: Label area QEMU would put at the end of each NVDIMM backing file (``label-size``). None: the namespaces are
#: label-less (raw) either way, and reading an empty 128 KiB label area through ACPI _DSM calls cost ~0.33 s
#: of every boot under TCG.
NVDIMM_LABEL_SIZE = 0
#: ndctl / the kernel's pfn device want namespace data in multiples of this alignment.
NVDIMM_ALIGN = 2 * MiB

PmemMode = Literal["raw", "fsdax", "devdax"]
PMEM_MODES: tuple[str, ...] = ("raw", "fsdax", "devdax")
Accel = Literal["auto", "kvm", "tcg"]

#: Guest RAM below 4 GiB: build_argv sets q35's ``max-ram-below-4g`` to this, so the split never depends on
#: QEMU's size heuristics; RAM beyond it sits at 4 GiB (after the 32-bit PCI hole).
RAM_BELOW_4G = 2 * GiB
MAX_MEMORY = 16 * GiB


def ram_ranges(memory: int) -> list[tuple[int, int, int]]:
    """(guest-physical start, offset in the RAM backing file, length) of each guest RAM range."""
    low = min(memory, RAM_BELOW_4G)
    return [(0, 0, low)] + ([(4 * GiB, low, memory - low)] if memory > low else [])


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
                "(QEMU and the kernel's pfn devices need size = N x 2M)"
            )

    @property
    def file_size(self) -> int:
        return self.size + NVDIMM_LABEL_SIZE

    @classmethod
    def parse(cls, text: str) -> PmemConfig:
        """``SIZE[:MODE]``, e.g. ``256M`` or ``512M:devdax``."""
        size_text, _, mode = text.partition(":")
        return cls(size=parse_size(size_text), mode=(mode or "raw"))  # type: ignore[arg-type]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class DeviceConfig:
    """One aperture device: ``mem`` bytes of device memory seen through a ``window``-sized BAR of ``slot``-sized
    slots (a slot maps one device page of the same size). ``hidden`` ranges can never be mapped."""

    mem: int = 256 * MiB
    window: int = 16 * MiB
    slot: int = 2 * MiB
    hidden: tuple[tuple[int, int], ...] = ((240 * MiB, 256 * MiB),)

    def __post_init__(self) -> None:
        from aperture.guest.abi import MAX_HIDDEN, MAX_SLOTS

        if not _pow2(self.window):
            raise ConfigError(f"window {format_size(self.window)} is not a power of two (QEMU aborts on such BARs)")
        if not _pow2(self.slot) or self.slot < 4 * KiB:
            raise ConfigError(f"slot {format_size(self.slot)} must be a power of two, at least 4K")
        if self.slot > self.window:
            raise ConfigError(f"slot {format_size(self.slot)} is larger than the window {format_size(self.window)}")
        if self.mem < self.window:
            raise ConfigError(f"the window {format_size(self.window)} is larger than device memory "
                              f"{format_size(self.mem)}")
        if self.window // self.slot > MAX_SLOTS:
            raise ConfigError(f"window/slot gives {self.window // self.slot} slots; at most {MAX_SLOTS}")
        if self.mem % self.slot or self.mem < self.window:
            raise ConfigError(f"device memory {format_size(self.mem)} must be a multiple of the slot size "
                              f"{format_size(self.slot)} and at least the window size")
        if self.mem > 64 * GiB:
            raise ConfigError("device memory above 64G is not supported")
        if len(self.hidden) > MAX_HIDDEN:
            raise ConfigError(f"at most {MAX_HIDDEN} hidden ranges")
        for start, end in self.hidden:
            if not 0 <= start < end <= self.mem or start % self.slot or end % self.slot:
                raise ConfigError(f"hidden range {format_size(start)}-{format_size(end)} must be page-aligned "
                                  f"({format_size(self.slot)}) and inside device memory")
        if sum(e - s for s, e in self.hidden) >= self.mem:
            raise ConfigError("hidden ranges cover all device memory")

    @property
    def nr_slots(self) -> int:
        return self.window // self.slot

    @property
    def nr_pages(self) -> int:
        return self.mem // self.slot

    def window_offsets(self) -> list[int]:
        """Device-memory offsets where the whole window fits without covering a hidden range (hotplug mode)."""
        return [o for o in range(0, self.mem - self.window + 1, self.slot)
                if not any(s < o + self.window and o < e for s, e in self.hidden)]

    def page_hidden(self, page: int) -> bool:
        off = page * self.slot
        return any(s <= off < e for s, e in self.hidden)

    @classmethod
    def parse(cls, text: str) -> DeviceConfig:
        """``aperture[,mem=SIZE,window=SIZE,slot=SIZE,hidden=START-END[+START-END]]``."""
        kind, _, rest = text.partition(",")
        if kind != "aperture":
            raise ConfigError(f"unknown device kind {kind!r}: expected 'aperture[,mem=..,window=..,slot=..,hidden=..]'")
        values: dict[str, str] = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("mem", "window", "slot", "hidden"):
                raise ConfigError(f"bad device option {item!r}: use mem=, window=, slot=, hidden=START-END")
            values[key] = value
        mem = parse_size(values["mem"]) if "mem" in values else 256 * MiB
        hidden: tuple[tuple[int, int], ...]
        if "hidden" in values:
            ranges = []
            for part in filter(None, values["hidden"].split("+")):
                a, sep, b = part.partition("-")
                if not sep:
                    raise ConfigError(f"bad hidden range {part!r}: expected START-END")
                ranges.append((parse_size(a), parse_size(b)))
            hidden = tuple(ranges)
        else:
            hidden = ((mem - 16 * MiB, mem),) if mem > 32 * MiB else ()
        return cls(mem=mem, window=parse_size(values.get("window", "16M")), slot=parse_size(values.get("slot", "2M")),
                   hidden=hidden)


#: The default topology: one NVDIMM in fsdax mode, one in devdax mode.
DEFAULT_PMEM: tuple[PmemConfig, ...] = (PmemConfig(256 * MiB, "fsdax"), PmemConfig(256 * MiB, "devdax"))

#: Two aperture devices, so device-to-device P2P is exercised.
DEFAULT_DEVICES: tuple[DeviceConfig, ...] = (DeviceConfig(), DeviceConfig())

#: The NVMe controller's namespace (a sparse file in the run dir) and its controller memory buffer, which a
#: kernel with PCI_P2PDMA publishes as p2pmem.
DEFAULT_NVME_SIZE = 64 * MiB
NVME_CMB_MB = 16

#: Size of the plain ivshmem BAR the probe matrix maps (a power of two: QEMU aborts otherwise).
PROBE_BAR_SIZE = 2 * MiB


#: Guest directories a share may not cover: the guest's own system (it would hide busybox, /init's mounts, the
#: helper's tools) and the DAX mount.
GUEST_SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/bin", "/sbin", "/lib", "/lib64", "/usr", "/etc", "/run")
GUEST_RESERVED_DIRS = ("/", "/tmp", "/mnt", "/mnt/fsdax", "/root")
MAX_SHARES = 8


@dataclass(frozen=True)
class ShareConfig:
    """A host directory the guest sees (9p over virtio: QEMU serves it, nothing else runs on the host)."""

    host: Path
    guest: str
    readonly: bool = False

    def __post_init__(self) -> None:
        if not self.host.exists():
            raise ConfigError(f"shared directory {self.host} does not exist")
        if not self.host.is_dir():
            raise ConfigError(f"shared path {self.host} is not a directory")
        g = self.guest
        if not g.startswith("/") or any(c.isspace() or c in ',:"\\' for c in g) or "/../" in g + "/":
            raise ConfigError(f"share guest path {g!r} must be absolute, without spaces, commas, colons or '..'")
        norm = "/" + "/".join(part for part in g.split("/") if part and part != ".")
        if norm in GUEST_RESERVED_DIRS or any(norm == d or norm.startswith(d + "/") for d in GUEST_SYSTEM_DIRS):
            raise ConfigError(f"share guest path {g!r} would cover a system directory of the guest; "
                              "choose another (e.g. /mnt/share or /work)")

    @classmethod
    def parse(cls, text: str) -> ShareConfig:
        """``HOSTDIR[:GUESTDIR][:ro|rw]``; GUESTDIR defaults to HOSTDIR's absolute path."""
        parts = text.split(":")
        mode = "rw"
        if len(parts) > 1 and parts[-1] in ("ro", "rw"):
            mode = parts.pop()
        if not parts[0] or len(parts) > 2:
            raise ConfigError(f"invalid share {text!r}: expected HOSTDIR[:GUESTDIR][:ro]")
        host = Path(parts[0]).expanduser().absolute()
        guest = parts[1] if len(parts) == 2 else str(host)
        return cls(host, "/" + "/".join(p for p in guest.split("/") if p) if guest.startswith("/") else guest,
                   mode == "ro")


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
    devices: tuple[DeviceConfig, ...] = field(default_factory=lambda: DEFAULT_DEVICES)
    force: bool = False  # let the guest overwrite foreign/mismatched NVDIMM info blocks
    window_hotplug: bool = False  # windows behind root ports, backed by device memory (hotplug remaps)
    guest_bins: tuple[Path, ...] = ()
    nvme: int = DEFAULT_NVME_SIZE  # namespace size of the NVMe controller with a CMB; 0: no NVMe
    shares: tuple[ShareConfig, ...] = ()
    user_modules: tuple[Path, ...] = ()  # the user's own .ko files, loaded after aperture's driver
    gdb: str = "off"  # on: QEMU's gdbstub on a socket; wait: and the CPUs halted until gdb continues them

    def __post_init__(self) -> None:
        if self.memory < 128 * MiB or self.memory % MiB:
            raise ConfigError(f"memory {format_size(self.memory)} must be a whole number of MiB, at least 128M")
        if self.memory > MAX_MEMORY:
            raise ConfigError(f"memory {format_size(self.memory)} is above the supported {format_size(MAX_MEMORY)}")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"invalid accelerator {self.accel!r}: choose auto, kvm or tcg")
        if not 0 < self.boot_timeout <= 3600 or not 0 < self.run_timeout <= 24 * 3600:
            raise ConfigError("timeouts must be positive (boot at most 3600 s)")
        if len(self.devices) > abi.MAX_DEVICES:
            raise ConfigError(f"at most {abi.MAX_DEVICES} aperture devices")
        if len(self.pmem) > 8:
            raise ConfigError("at most 8 NVDIMMs")
        for arg in self.kernel_cmdline_extra:
            if not arg or any(c.isspace() for c in arg) or '"' in arg:
                raise ConfigError(f"kernel argument {arg!r} must be one word without quotes")
        for b in self.guest_bins:
            if not b.is_file():
                raise ConfigError(f"guest binary {b}: no such file")
        for m in self.user_modules:
            if not m.is_file() or m.suffix != ".ko":
                raise ConfigError(f"kernel module {m}: not a .ko file")
        if self.gdb not in ("off", "on", "wait"):
            raise ConfigError(f"invalid gdb mode {self.gdb!r}: choose off, on or wait")
        if len({m.stem for m in self.user_modules}) != len(self.user_modules):
            raise ConfigError("two kernel modules of the same name")
        if self.nvme and not (16 * MiB <= self.nvme <= 16 * GiB and self.nvme % MiB == 0):
            raise ConfigError(f"nvme namespace {format_size(self.nvme)} must be whole MiB, 16M to 16G (or none)")
        if not 1 <= self.smp <= 8:
            raise ConfigError("smp must be between 1 and 8")
        if len(self.shares) > MAX_SHARES:
            raise ConfigError(f"at most {MAX_SHARES} shared directories")
        guests = [s.guest for s in self.shares]
        if len(set(guests)) != len(guests):
            raise ConfigError("two shared directories at the same guest path")


@dataclass(frozen=True)
class RemapPlan:
    """Host-driven remaps while the guest runs its window workload."""

    every: float = 0.02
    mode: str = "pause"
    duration: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("pause", "hotplug"):
            raise ConfigError(f"invalid remap mode {self.mode!r}: choose pause or hotplug")
        if not 0.001 <= self.every <= 60:
            raise ConfigError("the remap period must be between 1ms and 60s")
        if not 0.5 <= self.duration <= 3600:
            raise ConfigError("the workload duration must be between 0.5s and 1h")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _from_jsonable(hint: Any, value: Any) -> Any:
    """``value`` (from ``_jsonable``) back into the type ``hint`` names: dataclasses, tuples, paths, optionals."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        known = {f.name for f in dataclasses.fields(hint) if f.init}
        return hint(**{k: _from_jsonable(hints[k], v) for k, v in value.items() if k in known})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], v) for v in value)
        return tuple(_from_jsonable(a, v) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _from_jsonable(next(a for a in args if a is not type(None)), value)
    if hint is Path:
        return Path(value)
    return value


def config_to_dict(config: VmConfig) -> dict[str, Any]:
    """JSON-able form (the ``aperture up`` daemon's spec, the snapshot key), generated from the fields;
    ``config_from_dict`` re-validates it."""
    out: dict[str, Any] = _jsonable(config)
    return out


def config_from_dict(data: dict[str, Any]) -> VmConfig:
    config: VmConfig = _from_jsonable(VmConfig, data)
    return config
