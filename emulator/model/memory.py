"""Device memory, the control memory, and the BAR window onto device memory.

Invariant: a device page mapped into a window slot has exactly one live copy, the slot. Mapping another page
into the slot, unmapping it, or shutting down writes the slot back to device memory first.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

from aperture.emulator.config import DeviceConfig
from aperture.guest import abi

assert sys.byteorder == "little", "the device ABI is little-endian and the control memory uses native stores"


class FileBuffer:
    """A shared, writable mmap of a whole file, created at ``size`` if missing (sparse)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.flush()
            self.mm.close()
        except (ValueError, BufferError, OSError):
            pass


class ControlMemory:
    """Typed access to the control BAR: registers, hidden ranges, slot table, rings (see guest/abi.py).

    The guest reads this memory while we write it, so every register and slot-table entry is written with
    one aligned store through a typed memoryview. Never ``struct.pack_into`` here: CPython zero-fills the
    destination before it stores the value, and a guest polling ``CQ_HEAD`` (or the seqlock generation)
    sees that transient 0 — a completion that never happened.
    """

    def __init__(self, buf: mmap.mmap) -> None:
        if len(buf) < abi.CTL_SIZE:
            raise ValueError("control memory too small")
        self.buf = buf
        self._u32 = memoryview(buf).cast("I")  # native order: the host is x86-64, so little-endian like the ABI
        self._u64 = memoryview(buf).cast("Q")

    def _view(self, off: int, kind: str) -> tuple[memoryview, int]:
        return (self._u64, off // 8) if kind == "u64" else (self._u32, off // 4)

    def get(self, name: str) -> int:
        view, i = self._view(*abi.REGS[name])
        return int(view[i])

    def set(self, name: str, value: int) -> None:
        off, kind = abi.REGS[name]
        view, i = self._view(off, kind)
        view[i] = value & (2**64 - 1 if kind == "u64" else 0xFFFFFFFF)

    def slot_entry(self, slot: int) -> int:
        return int(self._u64[abi.reg("SLOT_TABLE") // 8 + slot])

    def set_slot_entry(self, slot: int, value: int) -> None:
        self._u64[abi.reg("SLOT_TABLE") // 8 + slot] = value

    def slot_pinned(self, slot: int) -> bool:
        """SLOT_PIN[slot] (ABI 1.2): the guest's driver says a peer may be DMAing to this slot; any non-zero value
        counts (a guest that pins everything only stops host remaps, it cannot make the host misbehave)."""
        return bool(self._u32[abi.reg("SLOT_PIN") // 4 + slot])

    def descriptor(self, index: int) -> bytes:
        """A copy of SQ entry ``index % RING_ENTRIES`` (copied once: the guest may change it under us)."""
        off = abi.reg("SQ") + (index % abi.RING_ENTRIES) * abi.DESC_SIZE
        return bytes(self.buf[off : off + abi.DESC_SIZE])

    def write_completion(self, index: int, tag: int, status: int, opcode: int, result: int) -> None:
        """Built whole, then copied in: the entry never passes through a zeroed state."""
        off = abi.reg("CQ") + (index % abi.RING_ENTRIES) * abi.COMPL_SIZE
        self.buf[off : off + abi.COMPL_SIZE] = abi.COMPL.pack(tag & 0xFFFFFFFF, status, opcode & 0xFFFF,
                                                               result & (2**64 - 1))

    def release(self) -> None:
        """Drop the typed views so the mmap can be closed."""
        self._u32.release()
        self._u64.release()

    def init(self, index: int, config: DeviceConfig, window_pci_slot: int) -> None:
        self.buf[: abi.CTL_SIZE] = bytes(abi.CTL_SIZE)
        self.set("ABI_VERSION", abi.ABI_MAJOR << 16 | abi.ABI_MINOR)
        self.set("DEVICE_INDEX", index)
        self.set("DEVMEM_SIZE", config.mem)
        self.set("WINDOW_SIZE", config.window)
        self.set("SLOT_SIZE", config.slot)
        self.set("NR_SLOTS", config.nr_slots)
        self.set("RING_ENTRIES", abi.RING_ENTRIES)
        self.set("NR_HIDDEN", len(config.hidden))
        self.set("WINDOW_PCI_SLOT", window_pci_slot)
        self.set("DOORBELL_PEER", abi.DOORBELL_PEER_ID)
        for i, (start, end) in enumerate(config.hidden):
            self._u64[abi.reg("HIDDEN") // 8 + 2 * i] = start
            self._u64[abi.reg("HIDDEN") // 8 + 2 * i + 1] = end
        self.set("STATUS", abi.STATUS_READY)
        self.set("MAGIC", abi.MAGIC)  # last: the guest trusts nothing before it sees the magic


class Window:
    """The BAR window: ``nr_slots`` slots, each the live copy of at most one device page."""

    def __init__(self, config: DeviceConfig, devmem: memoryview, bar: memoryview, ctl: ControlMemory) -> None:
        self.config = config
        self.devmem = devmem
        self.bar = bar  # what the guest sees through the window BAR (its backing file)
        self.ctl = ctl
        self.slots: list[int | None] = [None] * config.nr_slots
        self.page_slot: dict[int, int] = {}
        self.remaps = 0
        self.direct_offset: int | None = None  # hotplug topology: the window *is* device memory at this offset

    def _slot_view(self, slot: int) -> memoryview:
        s = self.config.slot
        return self.bar[slot * s : (slot + 1) * s]

    def _page_view(self, page: int) -> memoryview:
        s = self.config.slot
        return self.devmem[page * s : (page + 1) * s]

    def _publish(self, changes: dict[int, int], seqlock: bool = True) -> None:
        """Update slot-table entries under the seqlock: generation odd while entries change."""
        if not seqlock:  # negative control only: the guest can no longer tell a remap happened
            for slot, value in changes.items():
                self.ctl.set_slot_entry(slot, value)
            return
        gen = self.ctl.get("GENERATION")
        if gen & 1:
            gen += 1
        self.ctl.set("GENERATION", gen + 1)
        for slot, value in changes.items():
            self.ctl.set_slot_entry(slot, value)
        self.ctl.set("GENERATION", gen + 2)

    def announce(self, moves: dict[int, int | None]) -> None:
        """Negative control only: publish the new table without the seqlock, before any data has moved."""
        self._publish({slot: 0 if page is None else page + 1 for slot, page in moves.items()}, seqlock=False)

    def retarget(self, moves: dict[int, int | None], seqlock: bool = True) -> None:
        """Point each slot at a page (or nothing); callers have validated slots and pages.

        Two phases: every moved slot is written back and released before any is loaded, so a page that moves
        from one slot to another within the same call is loaded with its latest contents. Without the seqlock
        (negative control, after ``announce``) only the data moves: the table already names the new pages.
        """
        for slot in moves:
            old = self.slots[slot]
            if old is not None:
                self._page_view(old)[:] = self._slot_view(slot)
                del self.page_slot[old]
                self.slots[slot] = None
        for slot, page in moves.items():
            if page is not None:
                self._slot_view(slot)[:] = self._page_view(page)
                self.slots[slot] = page
                self.page_slot[page] = slot
            else:
                self._slot_view(slot)[:] = bytes(self.config.slot)
        self.remaps += len(moves)
        if seqlock:
            self._publish({slot: 0 if page is None else page + 1 for slot, page in moves.items()})

    def map(self, slot: int, page: int) -> None:
        self.retarget({slot: page})

    def unmap(self, slot: int) -> None:
        self.retarget({slot: None})

    def begin_transition(self) -> None:
        """Hotplug remap starting: generation odd and the table empty until ``set_direct`` publishes."""
        gen = self.ctl.get("GENERATION")
        self.ctl.set("GENERATION", gen + 1 if gen % 2 == 0 else gen)
        for slot in range(self.config.nr_slots):
            self.ctl.set_slot_entry(slot, 0)

    def set_direct(self, offset: int) -> None:
        """Zero-copy window: slot k is device page offset/slot + k, no copies (hotplug mode)."""
        if self.direct_offset is None:
            self.writeback_all()
        s = self.config.slot
        self.direct_offset = offset
        self.bar = self.devmem[offset : offset + self.config.window]
        first = offset // s
        self.slots = [first + k for k in range(self.config.nr_slots)]
        self.page_slot = {p: k for k, p in enumerate(self.slots) if p is not None}
        self.remaps += 1
        gen = self.ctl.get("GENERATION")
        if gen % 2 == 0:
            self.ctl.set("GENERATION", gen + 1)
        for slot, page in enumerate(self.slots):
            self.ctl.set_slot_entry(slot, 0 if page is None else page + 1)
        self.ctl.set("GENERATION", (gen | 1) + 1)

    def writeback_all(self) -> None:
        """Copy every mapped slot back to device memory (device memory is then the whole truth)."""
        if self.direct_offset is not None:
            return  # the window is device memory
        for slot, page in enumerate(self.slots):
            if page is not None:
                self._page_view(page)[:] = self._slot_view(slot)

    def device_view(self, offset: int, length: int) -> memoryview:
        """The live bytes for device-local [offset, offset+length), which must stay inside one page."""
        page, inner = divmod(offset, self.config.slot)
        slot = self.page_slot.get(page)
        if slot is not None:
            base = slot * self.config.slot + inner
            return self.bar[base : base + length]
        return self.devmem[offset : offset + length]
