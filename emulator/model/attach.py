"""How a device of the model is attached to QEMU: its doorbell device (served by our ivshmem server) and its
window BAR — the model's own part of the QEMU command line, also what a hotplug remap re-plugs."""

from __future__ import annotations

from aperture.emulator.config import DeviceConfig
from aperture.emulator.runpaths import DeviceFiles
from aperture.qmp_client.qemu import ctl_chardev_id, ctl_id, opt_value, port_id, win_backend_id, win_id

#: The PCI slot of device 0's doorbell function; its window is the next slot, device i takes two slots from
#: PCI_SLOT_BASE + 2 * i.
PCI_SLOT_BASE = 0x10


def device_qemu_args(i: int, config: DeviceConfig, files: DeviceFiles, hotplug: bool = False) -> list[str]:
    """QEMU arguments for device ``i``: a doorbell device served by us, and the window BAR.

    With ``hotplug`` the window sits behind its own pcie-root-port (ACPI hotplug) and is backed directly by
    the device-memory file at offset 0 (zero-copy; re-plugged at other offsets by hotplug remaps).
    """
    args = [
        "-chardev", f"socket,id={ctl_chardev_id(i)},path={opt_value(files.socket)}",
        # master=on everywhere: peer mode blocks migration (snapshots); a master is peer 0, the model peer 1
        "-device", f"ivshmem-doorbell,id={ctl_id(i)},chardev={ctl_chardev_id(i)},vectors=1,master=on,"
                   f"addr={PCI_SLOT_BASE + 2 * i:#x}",
    ]
    if not hotplug:
        return args + [
            "-object", f"memory-backend-file,id={win_backend_id(i)},size={config.window},"
                       f"mem-path={opt_value(files.window)},share=on",
            "-device", f"ivshmem-plain,id={win_id(i)},memdev={win_backend_id(i)},master=on,"
                       f"addr={PCI_SLOT_BASE + 2 * i + 1:#x}",
        ]
    return args + [
        "-device", f"pcie-root-port,id={port_id(i)},chassis={i + 1},slot={i + 1},pref64-reserve=64M,"
                   f"addr={PCI_SLOT_BASE + 2 * i + 1:#x}",
        "-object", f"memory-backend-file,id={win_backend_id(i)},size={config.window},"
                   f"mem-path={opt_value(files.devmem)},offset=0,share=on",
        "-device", f"ivshmem-plain,id={win_id(i)},memdev={win_backend_id(i)},master=on,bus={port_id(i)}",
    ]
