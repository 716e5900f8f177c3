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


class AddressMap:
    """Sorted, non-overlapping guest-physical regions."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = sorted(regions, key=lambda r: r.start)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.end > b.start:
                raise ValueError(f"regions overlap: {a.name} and {b.name}")

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
