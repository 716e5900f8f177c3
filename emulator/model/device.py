"""``ApertureDevice``: one device's memory, window, control memory, rings and command dispatch.

A hostile guest controls every byte of the control memory and the rings: each value is copied once, validated,
and answered with a status; nothing the guest writes can raise out of ``process_ring`` or make it loop forever.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

from aperture.emulator.config import DeviceConfig
from aperture.emulator.model.addrmap import AddressMap, DmaFault
from aperture.emulator.model.dma import DmaEngine
from aperture.emulator.model.memory import ControlMemory, FileBuffer, Window
from aperture.guest import abi

ST = abi.STATUS_CODES


class ApertureDevice:
    def __init__(self, index: int, config: DeviceConfig, devmem_path: Path, window_path: Path,
                 window_pci_slot: int, addrmap: Callable[[], AddressMap | None],
                 lock: threading.RLock | None = None,
                 refresh_map: Callable[[], AddressMap | None] | None = None) -> None:
        self.index = index
        self.config = config
        self.devmem = FileBuffer(devmem_path, config.mem)
        self.window_file = FileBuffer(window_path, config.window)
        self.ctl_fd = os.memfd_create(f"aperture{index}-ctl", os.MFD_CLOEXEC)
        os.ftruncate(self.ctl_fd, abi.CTL_SIZE)
        self.ctl_mm = mmap.mmap(self.ctl_fd, abi.CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.ctl = ControlMemory(self.ctl_mm)
        self.ctl.init(index, config, window_pci_slot)
        self.window = Window(config, self.devmem.view, self.window_file.view, self.ctl)
        self.dma = DmaEngine(addrmap, self.local_segments, refresh_map)
        self.lock = lock or threading.RLock()  # shared by all devices of a VM: P2P touches two devices
        self.errors: dict[str, int] = {}
        self.maps = 0
        self.more_work = False  # the last round stopped at its budget with descriptors left
        self.pinned_skips = 0  # host remaps that left a slot alone because the guest's driver pinned it

    # ------------------------------------------------------------------ device-local addressing
    def local_segments(self, offset: int, length: int) -> list[memoryview]:
        """Device-local [offset, +length): split per page, each page's live copy (window slot or memory)."""
        if not 0 <= offset < self.config.mem or length <= 0 or offset + length > self.config.mem:
            raise DmaFault("ERANGE", f"device offset [{offset:#x}, +{length:#x}) outside device memory")
        out = []
        page = self.config.slot
        while length:
            n = min(length, page - offset % page)
            out.append(self.window.device_view(offset, n))
            offset += n
            length -= n
        return out

    # ------------------------------------------------------------------ commands
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.config.nr_slots:
            raise DmaFault("ERANGE", f"slot {slot} out of range")

    def execute(self, raw: bytes) -> tuple[int, int]:
        """Run one descriptor; returns (status, result). Never raises."""
        try:
            d = abi.Descriptor.unpack(raw)
        except Exception:  # noqa: BLE001
            return ST["EINVAL"], 0
        try:
            if d.reserved0 or d.reserved1 or d.reserved2:
                raise DmaFault("EINVAL", "reserved field set")
            if d.opcode == abi.OP_NOP:
                if d.flags:
                    raise DmaFault("EINVAL", "flags on NOP")
                return ST["OK"], 0
            if d.opcode == abi.OP_MAP:
                return self._map(d.slot, d.page, d.flags)
            if d.opcode == abi.OP_UNMAP:
                if d.flags or self.window.direct_offset is not None:
                    raise DmaFault("EINVAL", "flags on UNMAP, or a host-managed window")
                self._check_slot(d.slot)
                self.window.unmap(d.slot)
                return ST["OK"], 0
            if d.opcode == abi.OP_DMA:
                return ST["OK"], self.dma.transfer(d.src, d.dst, d.length, d.flags)
            if d.opcode == abi.OP_DMA_LIST:
                if d.flags:
                    raise DmaFault("EINVAL", "flags on DMA_LIST")
                try:
                    return ST["OK"], self.dma.transfer_list(d.src, d.length)
                except DmaFault as fault:
                    self._count(fault)
                    return fault.status, getattr(fault, "index", 0)
            raise DmaFault("EINVAL", f"unknown opcode {d.opcode}")
        except DmaFault as fault:
            self._count(fault)
            return fault.status, 0
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the device; the guest gets an error
            self.errors["internal:" + type(exc).__name__] = self.errors.get("internal:" + type(exc).__name__, 0) + 1
            return ST["EINVAL"], 0

    def _count(self, fault: DmaFault) -> None:
        name = abi.STATUS_NAMES.get(fault.status, "?")
        self.errors[name] = self.errors.get(name, 0) + 1

    def _map(self, slot: int, page: int, flags: int) -> tuple[int, int]:
        if self.window.direct_offset is not None:
            raise DmaFault("EINVAL", "the window is host-managed (hotplug topology)")
        if flags:
            raise DmaFault("EINVAL", "flags on MAP")
        self._check_slot(slot)
        if not 0 <= page < self.config.nr_pages:
            raise DmaFault("ERANGE", f"page {page} out of range")
        if self.config.page_hidden(page):
            raise DmaFault("EACCES", f"page {page} is not exposable")
        other = self.window.page_slot.get(page)
        if other is not None and other != slot:
            raise DmaFault("EBUSY", f"page {page} already mapped in slot {other}")
        if other != slot:
            self.window.map(slot, page)
        self.maps += 1
        return ST["OK"], 0

    # ------------------------------------------------------------------ the ring
    def process_ring(self, doorbell: bool = True) -> int:
        """Consume the submission ring for one round; returns descriptors completed. Bounded whatever the guest
        writes: a round ends after ROUND_BYTES copied or ROUND_DESCRIPTORS completed (``more_work`` then says
        the ring still holds descriptors, and the caller comes back after giving everyone else a turn)."""
        done = 0
        copied_before = self.dma.bytes_copied
        self.more_work = False
        with self.lock:
            ctl = self.ctl
            if doorbell:
                ctl.set("DOORBELLS", ctl.get("DOORBELLS") + 1)
            for _ in range(4):  # a guest that keeps producing gets served in bounded rounds
                head, tail = ctl.get("SQ_HEAD"), ctl.get("SQ_TAIL")
                pending = (head - tail) & 0xFFFFFFFF
                if pending == 0:
                    break
                if pending > abi.RING_ENTRIES:
                    # Resynchronise first, publish the error last: a guest that sees ERRORS change may
                    # immediately read SQ_TAIL and must find the new value.
                    ctl.set("SQ_TAIL", head)
                    ctl.set("STATUS", ctl.get("STATUS") | abi.STATUS_RING_ERROR)
                    ctl.set("ERRORS", ctl.get("ERRORS") + 1)
                    break
                for _ in range(pending):
                    if (done >= abi.ROUND_DESCRIPTORS
                            or self.dma.bytes_copied - copied_before >= abi.ROUND_BYTES):
                        self.more_work = True  # the rest in the next round
                        return done
                    cq_head, cq_tail = ctl.get("CQ_HEAD"), ctl.get("CQ_TAIL")
                    used = (cq_head - cq_tail) & 0xFFFFFFFF
                    if used > abi.RING_ENTRIES:  # garbage CQ_TAIL: resynchronise rather than trust it
                        ctl.set("CQ_TAIL", cq_head)
                        ctl.set("STATUS", ctl.get("STATUS") | abi.STATUS_RING_ERROR)
                        ctl.set("ERRORS", ctl.get("ERRORS") + 1)
                    elif used == abi.RING_ENTRIES:
                        return done  # completion ring full: the guest must consume first
                    raw = ctl.descriptor(tail)
                    status, result = self.execute(raw)
                    tag = int.from_bytes(raw[4:8], "little")
                    opcode = int.from_bytes(raw[0:2], "little")
                    ctl.write_completion(cq_head, tag, status, opcode, result)
                    tail = (tail + 1) & 0xFFFFFFFF
                    ctl.set("SQ_TAIL", tail)
                    ctl.set("CQ_HEAD", (cq_head + 1) & 0xFFFFFFFF)
                    ctl.set("COMPLETED", ctl.get("COMPLETED") + 1)
                    done += 1
        return done

    def slot_pinned(self, slot: int) -> bool:
        return self.ctl.slot_pinned(slot)

    def retarget(self, moves: dict[int, int | None], seqlock: bool = True,
                 skip_pinned: bool = False) -> dict[int, int | None]:
        """Host-driven remap (validated here too: callers may be interactive users). A slot the guest's driver
        pinned (SLOT_PIN) is never moved: refused (EBUSY), or left out with ``skip_pinned`` (the remap
        controller, which reads the pins with the VM paused). Returns the moves done."""
        with self.lock:
            if self.window.direct_offset is not None:
                raise DmaFault("EINVAL", "the window is host-managed (hotplug topology): re-plug it instead")
            for slot in moves:
                self._check_slot(slot)
            pinned = sorted(s for s in moves if self.ctl.slot_pinned(s))
            if pinned and not skip_pinned:
                raise DmaFault("EBUSY", f"slot {pinned[0]} is pinned by the guest's driver (a peer may be DMAing to "
                                        "it): not remapped")
            moves = {s: p for s, p in moves.items() if s not in pinned}
            self.pinned_skips += len(pinned)
            staying = {p for s, p in enumerate(self.window.slots) if p is not None and s not in moves}
            targets = [p for p in moves.values() if p is not None]
            for page in moves.values():
                if page is None:
                    continue
                if not 0 <= page < self.config.nr_pages:
                    raise DmaFault("ERANGE", f"page {page} out of range")
                if self.config.page_hidden(page):
                    raise DmaFault("EACCES", f"page {page} is not exposable")
                if page in staying or targets.count(page) > 1:
                    raise DmaFault("EBUSY", f"page {page} would be live in two slots")
            if moves:
                self.window.retarget(moves, seqlock)
            return moves

    def stats(self) -> dict[str, object]:
        return {"index": self.index, "completed": self.ctl.get("COMPLETED"), "doorbells": self.ctl.get("DOORBELLS"),
                "maps": self.maps, "remaps": self.window.remaps, "dma_bytes": self.dma.bytes_copied,
                "dma_descriptors": self.dma.descriptors, "errors": dict(self.errors),
                "ring_errors": self.ctl.get("ERRORS"),
                "slots": [p for p in self.window.slots],
                "pinned": [s for s in range(self.config.nr_slots) if self.ctl.slot_pinned(s)],
                "pinned_skips": self.pinned_skips}

    def close(self) -> None:
        """Write every mapped slot back, then release the buffers. Idempotent."""
        with self.lock:
            if self.ctl_fd < 0:
                return
            try:
                self.window.writeback_all()
            finally:
                self.devmem.close()
                self.window_file.close()
                try:
                    self.ctl.release()
                    self.ctl_mm.close()
                except (BufferError, ValueError):
                    pass
                os.close(self.ctl_fd)
                self.ctl_fd = -1
