"""Hotplug-mode remaps need ``memory-backend-file.offset`` (QEMU ≥ 8.2 or so; 10.0 has it, 7.2 does not)."""

from __future__ import annotations

from .doctor import qemu_object_props
from .errors import SetupError


def hotplug_supported(qemu: str) -> bool:
    return "offset" in qemu_object_props(qemu, "memory-backend-file")


def require_hotplug(qemu: str) -> None:
    if not hotplug_supported(qemu):
        raise SetupError("--remap-mode hotplug needs a QEMU whose memory-backend-file has the 'offset' property "
                         "(QEMU 10 from bookworm-backports has it; run scripts/setup.sh)")
