"""``AddressMap``: guest-physical ranges → the host buffers behind them (RAM file, NVDIMM files, windows).

Every guest-supplied address goes through ``resolve``; nothing indexes a buffer with a raw guest value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aperture.guest import abi


class DmaFault(Exception):
    """A guest address or length the device refuses; carries the completion status."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = abi.STATUS_CODES[status]
        self.why = why


#: Resolves (offset into the region, length) → the live bytes; raises DmaFault.
Resolver = Callable[[int, int], list[memoryview]]


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    kind: str  # ram | pmem | window | register | bar
    name: str
    resolver: Resolver | None  # None: not a DMA target (registers, foreign BARs)


def _shifted(resolver: Resolver, by: int) -> Resolver:
    return lambda offset, length: resolver(offset + by, length)


def _disjoint(regions: list[Region]) -> list[Region]:
    """The regions as sorted, non-overlapping pieces. Where a guest has programmed one BAR on top of another (or of
    RAM), only the overlapped range is a ``conflict`` the device refuses; everything else stays reachable."""
    regions = [r for r in regions if r.start < r.end]
    points = sorted({r.start for r in regions} | {r.end for r in regions})
    pieces: list[Region] = []
    for lo, hi in zip(points, points[1:], strict=False):
        covering = [r for r in regions if r.start <= lo and hi <= r.end]
        if len(covering) == 1:
            r = covering[0]
            resolver = r.resolver if r.resolver is None or lo == r.start else _shifted(r.resolver, lo - r.start)
            pieces.append(Region(lo, hi, r.kind, r.name, resolver))
        elif covering:
            pieces.append(Region(lo, hi, "conflict", " over ".join(c.name for c in covering), None))
    return pieces


class AddressMap:
    """Sorted, non-overlapping guest-physical regions (overlaps a guest made are carved out as conflicts)."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = _disjoint(regions)

    def find(self, gpa: int) -> Region | None:
        for r in self.regions:
            if r.start <= gpa < r.end:
                return r
        return None

    def resolve(self, gpa: int, length: int) -> list[memoryview]:
        if not 0 <= gpa < 2**64 or length <= 0:
            raise DmaFault("EINVAL", "bad address or length")
        region = self.find(gpa)
        if region is None:
            raise DmaFault("EFAULT", f"{gpa:#x} is not backed by anything the device can reach")
        if gpa + length > region.end:
            raise DmaFault("ECROSS", f"[{gpa:#x}, +{length:#x}) crosses the end of {region.name}")
        if region.resolver is None:
            raise DmaFault("EFAULT", f"{gpa:#x} is in {region.name} ({region.kind}), not a DMA target")
        return region.resolver(gpa - region.start, length)

    def describe(self) -> list[dict[str, object]]:
        return [{"start": r.start, "end": r.end, "kind": r.kind, "name": r.name, "dma": r.resolver is not None}
                for r in self.regions]


def contiguous(view: memoryview) -> Resolver:
    """A region backed by one contiguous host buffer."""

    def resolve(offset: int, length: int) -> list[memoryview]:
        return [view[offset : offset + length]]

    return resolve
