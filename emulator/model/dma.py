"""``DmaEngine``: copies between resolved ranges, all-or-nothing: everything is validated before a byte moves."""

from __future__ import annotations

from collections.abc import Callable

from aperture.emulator.model.addrmap import AddressMap, DmaFault
from aperture.guest import abi

#: Resolves a device-local range of *this* device (flag DMA_*_LOCAL) into live segments.
LocalResolver = Callable[[int, int], list[memoryview]]


def copy_segments(dst: list[memoryview], src: list[memoryview]) -> None:
    """Copy the concatenation of ``src`` into the concatenation of ``dst`` (equal total lengths)."""
    if len(dst) == 1 and len(src) == 1:
        dst[0][:] = src[0]
        return
    si, so = 0, 0
    for d in dst:
        do = 0
        while do < len(d):
            s = src[si]
            n = min(len(d) - do, len(s) - so)
            d[do : do + n] = s[so : so + n]
            do += n
            so += n
            if so == len(s):
                si, so = si + 1, 0


class DmaEngine:
    def __init__(self, addrmap: Callable[[], AddressMap | None], local: LocalResolver,
                 refresh: Callable[[], AddressMap | None] | None = None) -> None:
        self._addrmap = addrmap
        self._local = local
        self._refresh = refresh  # rebuilds the map (rate-limited) when the guest moved something
        self.map_refreshes = 0
        self.bytes_copied = 0
        self.descriptors = 0

    def _map(self) -> AddressMap:
        m = self._addrmap()
        if m is None:
            raise DmaFault("ENOMAP", "no address map yet")
        return m

    def _resolve(self, addr: int, length: int) -> list[memoryview]:
        """Through the address map; an address it cannot place (or no map yet) gets one rebuild from QMP first:
        the guest may have reprogrammed a BAR (rescan, hotplug) since the map was built."""
        try:
            return self._map().resolve(addr, length)
        except DmaFault as fault:
            if self._refresh is None or fault.status not in (abi.STATUS_CODES["EFAULT"],
                                                              abi.STATUS_CODES["ENOMAP"]):
                raise
            fresh = self._refresh()
            if fresh is None:
                raise
            self.map_refreshes += 1
            return fresh.resolve(addr, length)

    def _side(self, addr: int, length: int, local: bool) -> list[memoryview]:
        return self._local(addr, length) if local else self._resolve(addr, length)

    def plan(self, src: int, dst: int, length: int, flags: int) -> tuple[list[memoryview], list[memoryview]]:
        """Validate one transfer and resolve both sides; raises DmaFault, writes nothing."""
        if flags & ~abi.DMA_FLAGS_MASK:
            raise DmaFault("EINVAL", f"unknown DMA flags {flags:#x}")
        if length <= 0:
            raise DmaFault("EINVAL", "zero length")
        if length > abi.MAX_DMA_LENGTH:
            raise DmaFault("ETOOBIG", f"length {length:#x} above {abi.MAX_DMA_LENGTH:#x}")
        return (self._side(src, length, bool(flags & abi.DMA_SRC_LOCAL)),
                self._side(dst, length, bool(flags & abi.DMA_DST_LOCAL)))

    def transfer(self, src: int, dst: int, length: int, flags: int) -> int:
        s, d = self.plan(src, dst, length, flags)
        copy_segments(d, s)
        self.bytes_copied += length
        self.descriptors += 1
        return length

    def transfer_list(self, table_gpa: int, count: int) -> int:
        """A list of transfers read from guest memory: all validated first, then all copied."""
        if count <= 0:
            raise DmaFault("EINVAL", "empty DMA list")
        if count > abi.MAX_LIST_ENTRIES:
            raise DmaFault("ETOOBIG", f"{count} list entries, at most {abi.MAX_LIST_ENTRIES}")
        table = b"".join(bytes(v) for v in self._resolve(table_gpa, count * abi.LIST_ENTRY_SIZE))
        plans = []
        total = 0
        for i, (src, dst, length, flags, reserved) in enumerate(abi.LIST_ENTRY.iter_unpack(table)):
            try:
                if reserved:
                    raise DmaFault("EINVAL", "reserved field set")
                plans.append(self.plan(src, dst, length, flags))
            except DmaFault as fault:
                fault.index = i  # type: ignore[attr-defined]
                raise
            total += length
            if total > abi.MAX_LIST_BYTES:
                too_big = DmaFault("ETOOBIG", f"list moves more than {abi.MAX_LIST_BYTES:#x} bytes")
                too_big.index = i  # type: ignore[attr-defined]
                raise too_big
        for s, d in plans:
            copy_segments(d, s)
        self.bytes_copied += total
        self.descriptors += count
        return total
