"""Everything aperture knows about QEMU itself, in one place: finding the binary, its version and features, the
syntax of option values, and the ids given to QEMU objects (made here, and parsed back here from QMP replies).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from aperture.guest.errors import ConfigError, SetupError

# ------------------------------------------------------------------ the binary


def find_qemu() -> str:
    """``$APERTURE_QEMU`` or ``qemu-system-x86_64`` on PATH."""
    path = os.environ.get("APERTURE_QEMU") or shutil.which("qemu-system-x86_64")
    if not path or not os.access(path, os.X_OK):
        raise SetupError("qemu-system-x86_64 not found (run scripts/setup.sh, or set APERTURE_QEMU)")
    return path


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=20).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def object_props(qemu: str, typename: str) -> list[str]:
    """The properties QEMU's ``-object TYPE,help`` lists (feature probes without booting anything)."""
    out = subprocess.run([qemu, "-object", f"{typename},help"], capture_output=True, text=True, timeout=20)
    return [line.split("=", 1)[0].strip() for line in out.stdout.splitlines() if "=" in line]


def hotplug_supported(qemu: str) -> bool:
    """Hotplug-mode remaps re-plug the window at another offset of the device-memory file:
    ``memory-backend-file.offset`` (QEMU 10 has it, 7.2 does not)."""
    return "offset" in object_props(qemu, "memory-backend-file")


def require_hotplug(qemu: str) -> None:
    if not hotplug_supported(qemu):
        raise SetupError("hotplug remaps need a QEMU whose memory-backend-file has the 'offset' property "
                         "(QEMU 10 from bookworm-backports has it; run scripts/setup.sh)")


# ------------------------------------------------------------------ option syntax


def opt_value(value: str | Path) -> str:
    """A value as QEMU's option parser reads it back: a comma is written as two (``/tmp/a,b`` → ``/tmp/a,,b``),
    so a path can never smuggle in another option (``…,share=off``). Newlines and NULs cannot be quoted."""
    text = str(value)
    if "\n" in text or "\0" in text:
        raise ConfigError(f"{text!r}: a QEMU option value cannot hold a newline or NUL")
    return text.replace(",", ",,")


def plain_arg(value: str | Path) -> str:
    """A whole argument QEMU takes verbatim (``-kernel PATH``, ``-append LINE``): nothing to quote, but a
    newline or NUL would still not survive, so refuse them."""
    text = str(value)
    if "\n" in text or "\0" in text:
        raise ConfigError(f"{text!r}: a QEMU argument cannot hold a newline or NUL")
    return text


# ------------------------------------------------------------------ object ids

NVME_ID = "nvme0"
NVME_DRIVE_ID = "nvme0drive"
#: The pcie-root-port the NVMe controller sits behind: QEMU's NVMe cannot be migrated, so a snapshot is taken
#: with the port empty and the controller is hot-plugged into it after a restore (and cold-plugged there on a
#: cold boot, so both see one topology).
NVME_PORT_ID = "nvme0port"
PROBE_BAR_ID = "probe-bar"
PROBE_BAR_BACKEND_ID = "probebar"
RAM_BACKEND_ID = "ram0"


def ctl_id(i: int) -> str:
    """Device ``i``'s doorbell (control BAR) device."""
    return f"aperture{i}-ctl"


def ctl_chardev_id(i: int) -> str:
    return f"apctl{i}"


def win_id(i: int) -> str:
    """Device ``i``'s window device (ivshmem-plain)."""
    return f"aperture{i}-win"


def win_backend_id(i: int, generation: int = 0) -> str:
    """The memory backend behind device ``i``'s window; each hotplug remap plugs a new generation."""
    return f"apwin{i}" if generation == 0 else f"apwin{i}-g{generation}"


def port_id(i: int) -> str:
    """The pcie-root-port device ``i``'s window is hot-plugged on."""
    return f"aprp{i}"


def share_id(i: int) -> str:
    """Shared directory ``i``: its -fsdev id and the 9p mount tag the guest mounts."""
    return f"share{i}"


def pmem_backend_id(i: int) -> str:
    return f"pmem{i}"


def nvdimm_id(i: int) -> str:
    return f"nvdimm{i}"


def pmem_index(memdev: str | None) -> int:
    """NVDIMM index from its QMP memdev path (``/objects/pmemN``, from ``pmem_backend_id``), or -1."""
    tail = (memdev or "").rsplit("/", 1)[-1]
    if not tail.startswith("pmem"):
        return -1
    number = tail[len("pmem"):]
    return int(number) if number.isdigit() else -1
