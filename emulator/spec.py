"""``VmSpec``: one VM as a user describes it — its topology (``VmConfig``) and its kernel — built from one table
of options. The CLI (one decorator for every command that boots a VM), the pytest marker and the ``aperture up``
daemon all parse into it, so a new VM option is one row of ``VM_OPTIONS`` (plus its use in qemu_argv.py).

Values arrive as the user wrote them (a string, or a list of strings for a repeatable option; the marker may also
give numbers and booleans); each row's ``parse`` turns that into the field's value and raises ConfigError with a
message that names no command-line flag — the front end adds its own name for the option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aperture.emulator.config import (
    DEFAULT_DEVICES,
    DEFAULT_PMEM,
    DeviceConfig,
    PmemConfig,
    ShareConfig,
    VmConfig,
    config_from_dict,
    config_to_dict,
)
from aperture.guest.errors import ConfigError
from aperture.guest.kernelspec import KernelSpec
from aperture.guest.units import parse_size

Target = Literal["config", "kernel"]


def _texts(value: Any) -> list[Any]:
    """A repeatable option's values: a list/tuple as given, one value as a list of one, nothing as []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _optional_path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(str(value)).expanduser()


def _devices(value: Any) -> tuple[DeviceConfig, ...]:
    if isinstance(value, int) and not isinstance(value, bool):  # the marker's devices=N
        if not 0 <= value <= 8:
            raise ConfigError(f"devices={value}: between 0 and 8")
        return tuple(DeviceConfig() for _ in range(value))
    texts = [str(v) for v in _texts(value)]
    if not texts:
        return DEFAULT_DEVICES
    if texts == ["none"]:
        return ()
    return tuple(DeviceConfig.parse(t) for t in texts)


def _nvme(value: Any) -> int:
    return 0 if value in (None, "none", "0", 0) else parse_size(str(value))


def _float(what: str, low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what} must be a number of seconds, got {value!r}") from exc
        if not low <= number <= high:
            raise ConfigError(f"{what} must be between {low:g} and {high:g} s")
        return number

    return parse


def _int(what: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be a whole number, got {value!r}") from exc


def _accel(value: Any) -> str:
    if value not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"invalid accelerator {value!r}: choose auto, kvm or tcg")
    return str(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class VmOption:
    """One VM option: its name (the marker's keyword, and ``VmConfig``'s field unless ``field`` says another),
    its command-line flag, how the user's text becomes the value, and its default, as the user would write it."""

    name: str
    flag: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    multiple: bool = False
    is_flag: bool = False
    target: Target = "config"
    field: str = ""
    choices: tuple[str, ...] = ()
    #: The value of the flag given without one (``--gdb`` means ``--gdb on``), or None
    flag_value: str | None = None

    @property
    def dest(self) -> str:
        return self.field or self.name


#: Every VM option, in --help order: the one place its default, its parsing and its help live.
VM_OPTIONS: tuple[VmOption, ...] = (
    VmOption("kernel", "--kernel", lambda v: None if v in (None, "") else str(v), None,
             "The guest kernel: 'built' (default: the kernel `aperture kernel build` made, P2PDMA/DEVICE_PRIVATE/HMM "
             "on), 'built-debug' (its debug flavour: KASAN, lockdep, DEBUG_VM), 'debian' (Debian's prebuilt kernel), "
             "a bzImage / PVH ELF vmlinux of your own, or the directory of a kernel build tree (in-tree or O=: its "
             "image, .config and modules; aperture's driver and hmm-tests built against it).",
             metavar="built|built-debug|debian|PATH|DIR", target="kernel"),
    VmOption("modules", "--modules", _optional_path, None,
             "Modules for --kernel PATH: lib/modules/<release> or a root containing it (not needed when everything "
             "is built in).", metavar="DIR", target="kernel"),
    VmOption("kernel_config", "--config", _optional_path, None,
             "The .config of --kernel PATH (default: config-<release> or .config beside it, else the kernel's own "
             "IKCONFIG).", metavar="FILE", target="kernel"),
    VmOption("pmem", "--pmem", lambda v: tuple(PmemConfig.parse(str(t)) for t in _texts(v)) or DEFAULT_PMEM, (),
             "An NVDIMM of SIZE (multiple of 2M), MODE raw|fsdax|devdax. Repeatable. Default: 256M:fsdax and "
             "256M:devdax.", metavar="SIZE[:MODE]", multiple=True),
    VmOption("devices", "--device", _devices, (),
             "An aperture device (repeatable; 'none' for no device). Default: two of "
             "mem=256M,window=16M,slot=2M,hidden=240M-256M.",
             metavar="aperture[,mem=SIZE,window=SIZE,slot=SIZE,hidden=START-END]", multiple=True),
    VmOption("nvme", "--nvme", _nvme, "64M",
             "An NVMe controller with a 16 MiB controller memory buffer (published as p2pmem by a kernel with "
             "PCI_P2PDMA) and a SIZE namespace; 'none' for no NVMe.", metavar="SIZE|none"),
    VmOption("memory", "--memory", lambda v: parse_size(str(v)) if not isinstance(v, int) else v, "512M",
             "Guest RAM, 128M to 16G (beyond 2G it continues at 4 GiB, as a DMA target too).", metavar="SIZE"),
    VmOption("accel", "--accel", _accel, "auto", "auto: KVM only if a probe boot works, else TCG.",
             choices=("auto", "kvm", "tcg")),
    VmOption("smp", "--smp", lambda v: _int("the vCPU count", v), 1, "Guest vCPUs, 1 to 8 (TCG runs one host "
             "thread each).", metavar="N"),
    VmOption("boot_timeout", "--boot-timeout", _float("the boot timeout", 1, 3600), 60.0,
             "Seconds until the guest helper must report.", metavar="SECONDS"),
    VmOption("timeout", "--timeout", _float("the run timeout", 1, 86400), 120.0,
             "Seconds for the whole run.", metavar="SECONDS", field="run_timeout"),
    VmOption("append", "--append", lambda v: tuple(str(t) for t in _texts(v)), (),
             "Extra kernel command-line argument (repeatable), e.g. loglevel=7.", metavar="ARG", multiple=True,
             field="kernel_cmdline_extra"),
    VmOption("shares", "--share", lambda v: tuple(ShareConfig.parse(str(t)) for t in _texts(v)), (),
             "Make a host directory visible in the guest (9p; repeatable). GUESTDIR defaults to the same path; :ro "
             "refuses writes from the guest.", metavar="HOSTDIR[:GUESTDIR][:ro]", multiple=True),
    VmOption("guest_bins", "--guest-bin", lambda v: tuple(Path(str(t)).expanduser() for t in _texts(v)), (),
             "Host binary to put into the guest's /usr/local/bin, with its shared libraries. Repeatable.",
             metavar="FILE", multiple=True),
    VmOption("user_modules", "--module", lambda v: tuple(Path(str(t)).expanduser().resolve() for t in _texts(v)),
             (), "A kernel module of your own (built against the guest kernel: `aperture kernel info` names the "
             "tree) to put into the image and load after aperture's driver. Repeatable.", metavar="FILE.ko",
             multiple=True),
    VmOption("gdb", "--gdb", lambda v: "on" if v is True else str(v), "off",
             "QEMU's gdbstub on a socket (`aperture gdb NAME` attaches); wait: the CPUs halt before the kernel's "
             "first instruction until gdb continues them (no boot timeout then).", choices=("off", "on", "wait"),
             metavar="[on|wait]", flag_value="on"),
    VmOption("force", "--force", _flag, False,
             "Let the guest overwrite an NVDIMM whose info block is foreign, corrupted or of another mode "
             "(destroys that NVDIMM's data).", is_flag=True),
)

OPTIONS_BY_NAME = {o.name: o for o in VM_OPTIONS}


class VmOptionError(ConfigError):
    """A VM option's value is bad; ``option`` says which, so each front end can name it its own way."""

    def __init__(self, option: VmOption, cause: ConfigError) -> None:
        super().__init__(cause.message)
        self.option = option


@dataclass(frozen=True)
class VmSpec:
    """One VM: its topology and run rules (``config``) and the kernel it boots (``kernel``: None or 'built',
    'debian', or a path; ``modules`` and ``kernel_config`` go with a path)."""

    config: VmConfig = field(default_factory=VmConfig)
    kernel: str | None = None
    modules: Path | None = None
    kernel_config: Path | None = None

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> VmSpec:
        """Values by option name (missing ones take their default); unknown names are refused."""
        unknown = sorted(set(values) - set(OPTIONS_BY_NAME))
        if unknown:
            raise ConfigError(f"unknown VM option {', '.join(unknown)} (known: {', '.join(OPTIONS_BY_NAME)})")
        parsed: dict[Target, dict[str, Any]] = {"config": {}, "kernel": {}}
        for option in VM_OPTIONS:
            raw = values.get(option.name, option.default)
            try:
                parsed[option.target][option.dest] = option.parse(raw)
            except ConfigError as exc:
                raise VmOptionError(option, exc) from exc
        if parsed["config"].get("gdb") == "wait":  # the user steps through boot: no time limit on it
            parsed["config"].update(boot_timeout=3600.0, run_timeout=max(parsed["config"]["run_timeout"], 86400.0))
        try:
            config = VmConfig(**parsed["config"])
        except ConfigError as exc:
            raise ConfigError(exc.message) from exc
        return cls(config, **parsed["kernel"])

    def resolve_kernel(self) -> KernelSpec:
        from aperture.guest.kernel import resolve_kernel

        try:
            return resolve_kernel(self.kernel, self.modules, self.kernel_config)
        except VmOptionError:
            raise
        except ConfigError as exc:  # a kernel choice that cannot be: said as the kernel option's error
            raise VmOptionError(OPTIONS_BY_NAME["kernel"], exc) from exc

    def replace(self, **config_changes: Any) -> VmSpec:
        """The same VM with some of its configuration changed (re-validated)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **config_changes))

    def for_workload(self, duration: float) -> VmSpec:
        """The run rule for a workload that runs ``duration`` seconds (remaps, the fuzzer): the whole run gets
        that long plus 90 s for boot and verification."""
        return self.replace(run_timeout=max(self.config.run_timeout, duration + 90))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the ``aperture up`` daemon's spec); ``from_dict`` re-validates it."""
        return {"config": config_to_dict(self.config), "kernel": self.kernel,
                "modules": str(self.modules) if self.modules else None,
                "kernel_config": str(self.kernel_config) if self.kernel_config else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmSpec:
        return cls(config_from_dict(data["config"]), data.get("kernel"), _optional_path(data.get("modules")),
                   _optional_path(data.get("kernel_config")))

