"""The QEMU command line, built in one place: every option value goes through ``opt_value`` (commas doubled)
and every verbatim argument through ``plain_arg``; ids come from qmp_client.qemu, which also parses them back.
Pure functions: unit-tested without QEMU."""

from __future__ import annotations

from pathlib import Path

from aperture.emulator.config import (
    NVDIMM_LABEL_SIZE,
    NVME_CMB_MB,
    PROBE_BAR_SIZE,
    RAM_BELOW_4G,
    VmConfig,
)
from aperture.emulator.model.attach import device_qemu_args
from aperture.emulator.runpaths import RunPaths
from aperture.guest.abi import COMMAND_PORT, RESULTS_PORT, SHELL_PORT, Env
from aperture.guest.kernelspec import KernelSpec
from aperture.guest.units import GiB
from aperture.qmp_client.qemu import (
    NVME_DRIVE_ID,
    NVME_ID,
    NVME_PORT_ID,
    PROBE_BAR_BACKEND_ID,
    PROBE_BAR_ID,
    RAM_BACKEND_ID,
    nvdimm_id,
    opt_value,
    plain_arg,
    pmem_backend_id,
    share_id,
)

PROBE_BAR_SLOT = 0x0F
NVME_PORT_SLOT = 0x0E
NVME_PORT_CHASSIS = 16  # window hotplug ports use chassis 1..MAX_DEVICES
#: Prefetchable window the firmware reserves behind the NVMe's port: room for the CMB BAR of a controller
#: hot-plugged after a restore (an empty port otherwise gets no window, and the CMB no address).
NVME_PORT_PREF64 = "32M"


#: The TCG CPU: every feature TCG has, reporting an AMD Zen family (0x17). Linux's P2PDMA lets a peer (the NVMe
#: controller) DMA into another device's BAR (an aperture window registered as P2P memory) through the host
#: bridge only on whitelisted host bridges or on Zen and later CPUs; QEMU's q35 bridge is not on the list.
TCG_CPU = "max,family=23,model=1"


#: The NVMe controller, described once: ``-device`` at boot (``nvme_device_args``) and QMP ``device_add`` after a
#: restore (warm.py) are both made from it.
NVME_DEVICE: dict[str, str | int] = {"driver": "nvme", "id": NVME_ID, "serial": "aperture0", "drive": NVME_DRIVE_ID,
                                     "cmb_size_mb": NVME_CMB_MB, "bus": NVME_PORT_ID}


def nvme_device_args() -> str:
    """The NVMe controller's -device value."""
    return ",".join([str(NVME_DEVICE["driver"])] + [f"{k}={v}" for k, v in NVME_DEVICE.items() if k != "driver"])


def build_argv(qemu: str, config: VmConfig, kernel: KernelSpec, initrd: Path, paths: RunPaths, accel: str,
               cmdline: str, user_qmp: bool = False, command_channel: bool = False,
               plug_nvme: bool = True) -> list[str]:
    """The full QEMU command line for one VM (pure: unit-tested without QEMU). ``plug_nvme=False``: the NVMe's
    root port and drive only (a snapshot's topology; the controller is hot-plugged after a restore)."""
    mem = config.memory
    pmem_total = sum(-(-p.file_size // GiB) * GiB for p in config.pmem)
    argv = [
        qemu,
        "-name", opt_value(paths.name),
        *(["-gdb", f"unix:{opt_value(paths.gdb_socket)},server=on,wait=off"] if config.gdb != "off" else []),
        *(["-S"] if config.gdb == "wait" else []),
        "-machine", f"q35,nvdimm=on,memory-backend={RAM_BACKEND_ID},max-ram-below-4g={RAM_BELOW_4G}",
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else TCG_CPU,
        "-smp", str(config.smp),
        "-m", f"{mem // (1 << 20)}M,slots={max(len(config.pmem), 1)},maxmem={(mem + pmem_total) // (1 << 20) + 1024}M",
        "-object", f"memory-backend-file,id={RAM_BACKEND_ID},size={mem},mem-path={opt_value(paths.ram)},share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-nic", "none",
        "-chardev", f"file,id=con,path={opt_value(paths.console)}",
        "-serial", "chardev:con",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"file,id=results,path={opt_value(paths.results)}",
        "-device", f"virtserialport,bus=vser0.0,chardev=results,name={RESULTS_PORT}",
        "-qmp", f"unix:{opt_value(paths.qmp_socket)},server=on,wait=off",
        "-kernel", plain_arg(kernel.image),
        "-initrd", plain_arg(initrd),
        "-append", plain_arg(cmdline),
        "-no-reboot",
        "-object", f"memory-backend-file,id={PROBE_BAR_BACKEND_ID},size={PROBE_BAR_SIZE},"
                   f"mem-path={opt_value(paths.probe_bar)},share=on",
        "-device", f"ivshmem-plain,id={PROBE_BAR_ID},memdev={PROBE_BAR_BACKEND_ID},master=on,"
                   f"addr={PROBE_BAR_SLOT:#x}",
    ]
    for i, (dev, files) in enumerate(zip(config.devices, paths.device_files(len(config.devices)), strict=True)):
        argv += device_qemu_args(i, dev, files, config.window_hotplug)
    if user_qmp:
        argv += ["-chardev", f"socket,id=uqmp,path={opt_value(paths.user_qmp_socket)},server=on,wait=off",
                 "-mon", "chardev=uqmp,mode=control"]
    if command_channel:
        argv += ["-chardev", f"socket,id=cmd,path={opt_value(paths.command_socket)},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=cmd,name={COMMAND_PORT}",
                 "-chardev", f"socket,id=shell,path={opt_value(paths.shell_socket)},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=shell,name={SHELL_PORT}"]
    if config.nvme:
        argv += ["-drive", f"file={opt_value(paths.nvme)},if=none,id={NVME_DRIVE_ID},format=raw",
                 "-device", f"pcie-root-port,id={NVME_PORT_ID},chassis={NVME_PORT_CHASSIS},slot={NVME_PORT_CHASSIS},"
                            f"pref64-reserve={NVME_PORT_PREF64},addr={NVME_PORT_SLOT:#x}"]
        if plug_nvme:
            argv += ["-device", nvme_device_args()]
    for i, share in enumerate(config.shares):
        argv += ["-fsdev", f"local,id={share_id(i)},path={opt_value(share.host)},security_model=none"
                 + (",readonly=on" if share.readonly else ""),
                 "-device", f"virtio-9p-pci,fsdev={share_id(i)},mount_tag={share_id(i)}"]
    for i, p in enumerate(config.pmem):
        argv += [
            "-object", f"memory-backend-file,id={pmem_backend_id(i)},size={p.file_size},"
                       f"mem-path={opt_value(paths.pmem(i))},share=on",
            "-device", f"nvdimm,id={nvdimm_id(i)},memdev={pmem_backend_id(i)}"
            + (f",label-size={NVDIMM_LABEL_SIZE}" if NVDIMM_LABEL_SIZE else ""),
        ]
    return argv


def kernel_cmdline(config: VmConfig, scenario: str, guest_env: dict[str, str] | None = None) -> str:
    """Kernel arguments; ``aperture_*`` ones reach the guest's /init and helper as environment variables."""
    env: dict[str, str] = {Env.SCENARIO: scenario, Env.PMEM: str(len(config.pmem)),
           Env.PMEM_MODES: ",".join(p.mode for p in config.pmem), Env.FORCE: str(int(config.force)),
           Env.DEVICES: str(len(config.devices)), Env.PROBE_BAR: f"0000:00:{PROBE_BAR_SLOT:02x}.0"}
    if config.shares:  # /init mounts them: TAG:GUESTDIR:ro|rw, comma separated
        env[Env.SHARES] = ",".join(f"{share_id(i)}:{s.guest}:{'ro' if s.readonly else 'rw'}"
                                   for i, s in enumerate(config.shares))
    env.update(guest_env or {})
    # loglevel=5: KERN_WARNING and above reach the console, so guest.dmesg sees every WARNING, lockdep and KASAN
    # report (a quiet boot prints two such lines)
    parts = ["console=ttyS0", "panic=-1", "loglevel=5"] + [f"{k}={v}" for k, v in env.items()]
    return " ".join(parts + list(config.kernel_cmdline_extra))
