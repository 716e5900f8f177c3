"""A cpio "newc" archive writer (the initramfs format), and a reader for tests and ``image info``."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class CpioWriter:
    """Writes entries in order; parents must be added before children (the kernel does not create them)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 1
        self.names: set[str] = set()

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int]) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        head = _MAGIC + b"".join(b"%08x" % v for v in fields)
        self.ino += 1
        raw_name = name.encode() + b"\0"
        self.out.write(head + raw_name + _pad4(len(head) + len(raw_name)))

    def add(self, entry: Entry) -> None:
        name = entry.name.lstrip("/")
        if not name or name in self.names:
            raise ValueError(f"bad or duplicate cpio entry name {entry.name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self.names:  # the kernel does not create missing parents
            self.add(Entry(parent, stat.S_IFDIR | 0o755))
        self.names.add(name)
        self._header(name, entry.mode, len(entry.data), entry.rdev)
        self.out.write(entry.data + _pad4(len(entry.data)))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self.add(Entry(name, stat.S_IFDIR | perm))

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(Entry(name, stat.S_IFREG | perm, data))

    def symlink(self, name: str, target: str) -> None:
        self.add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(Entry(name, stat.S_IFCHR | perm, rdev=(major, minor)))

    def close(self) -> None:
        self._header(_TRAILER, 0, 0, (0, 0))
        pos = self.out.tell()
        self.out.write(b"\0" * ((512 - pos % 512) % 512))


def read_cpio(data: bytes) -> list[Entry]:
    """Parse a newc archive (no compression) into entries, stopping at the trailer."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != _MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += (4 - pos % 4) % 4
        body = data[pos : pos + size]
        pos += size
        pos += (4 - pos % 4) % 4
        if name == _TRAILER:
            return entries
        entries.append(Entry(name, mode, body, (rmaj, rmin)))
