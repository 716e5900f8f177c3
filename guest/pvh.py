"""Extract the ELF vmlinux from a bzImage so QEMU can boot it through its PVH entry (no decompressor)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from aperture.guest.errors import SetupError
from aperture.guest.kernelspec import KernelSpec

from .cache import cache_root, private_tmp
from .elf import pvh_entry

_DECOMPRESSORS = {b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"], b"\xfd7zXZ": ["xz", "-dcq"], b"\x1f\x8b": ["gzip", "-dcq"]}


def bzimage_payload(data: bytes) -> tuple[bytes | None, str]:
    """The decompressed ELF vmlinux inside a bzImage: (vmlinux bytes, "") or (None, reason)."""
    if data[0x202:0x206] != b"HdrS":
        return None, "not a bzImage"
    setup_sects = data[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    offset = int.from_bytes(data[0x248:0x24C], "little")
    length = int.from_bytes(data[0x24C:0x250], "little")
    payload = data[pm_start + offset : pm_start + offset + length]
    argv = next((a for magic, a in _DECOMPRESSORS.items() if payload.startswith(magic)), None)
    if argv is None:
        return None, "unknown bzImage payload compression"
    if shutil.which(argv[0]) is None:
        return None, f"{argv[0]} is not installed (scripts/setup.sh installs it)"
    proc = subprocess.run(argv, input=payload[:-4] if argv[0] == "zstd" else payload, capture_output=True)
    if not proc.stdout.startswith(b"\x7fELF"):
        return None, f"decompressing the payload failed: {proc.stderr.decode(errors='replace').strip()[:100]}"
    return proc.stdout, ""


def extract_pvh_vmlinux(kernel: KernelSpec) -> tuple[Path | None, str]:
    """Return (vmlinux, "") or (None, reason). Cached next to the other guest artefacts."""
    data = kernel.image.read_bytes()
    if data[:4] == b"\x7fELF":
        return (kernel.image, "") if pvh_entry(kernel.image) is not None else (None, "ELF kernel has no PVH note")
    out = cache_root() / "pvh" / kernel.release / "vmlinux"
    if out.exists():
        return out, ""
    vmlinux, why = bzimage_payload(data)
    if vmlinux is None:
        return None, why
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(out)
    tmp.write_bytes(vmlinux)
    try:
        if pvh_entry(tmp) is None:
            tmp.unlink()
            return None, "the kernel was built without CONFIG_PVH"
    except SetupError as exc:
        tmp.unlink(missing_ok=True)
        return None, exc.message
    tmp.replace(out)
    return out, ""
