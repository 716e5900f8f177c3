"""``DeviceService``: the host side of every aperture device in one VM.

Owns the devices, their ivshmem servers and one emulator thread that accepts QEMU's connections and serves
doorbells. Started before QEMU (QEMU exits if the server is not listening) and stopped after it (so the final
write-back of window slots sees every guest write).
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aperture.emulator.config import DeviceConfig, PmemConfig, ram_ranges
from aperture.emulator.model.addrmap import AddressMap, DmaFault, Region, contiguous
from aperture.emulator.model.attach import PCI_SLOT_BASE, device_qemu_args
from aperture.emulator.model.device import ApertureDevice
from aperture.emulator.model.ivshmem_server import IvshmemServer
from aperture.emulator.model.memory import FileBuffer
from aperture.emulator.runpaths import DeviceFiles
from aperture.guest import abi
from aperture.qmp_client.qemu import ctl_id, pmem_index, win_id

LOOP_ERRORS_KEPT = 10
LOOP_ERRORS_LOGGED = 100
#: Seconds between two address-map rebuilds caused by addresses the map could not place.
MAP_REFRESH_INTERVAL = 0.5


class DeviceService:
    def __init__(self, configs: tuple[DeviceConfig, ...], files: list[DeviceFiles], *, ram: Path, memory: int,
                 pmem: list[tuple[Path, PmemConfig]], qmp: Callable[[], Any], hotplug: bool = False,
                 log: logging.Logger | None = None) -> None:
        #: Where the emulator thread's errors go (the VM's emulator.log); a module logger when used alone.
        self.log = log or logging.getLogger(__name__)
        self.hotplug = hotplug
        self.configs = configs
        self.files = files
        self.ram_path = ram
        self.memory = memory
        self.pmem_spec = pmem
        self._qmp = qmp
        self.devices: list[ApertureDevice] = []
        self.servers: list[IvshmemServer] = []
        self.lock = threading.RLock()
        self._map: AddressMap | None = None
        self._map_refreshed_at = -MAP_REFRESH_INTERVAL  # the last rebuild a fault asked for
        self.map_error: str | None = None  # why the last build failed (memmap says it, not a guess)
        self._buffers: list[FileBuffer] = []
        self._thread: threading.Thread | None = None
        self._stop_fd = -1
        #: Exceptions in the emulator thread: the first few kept (the run fails naming them), all counted and
        #: logged to the run dir's emulator.log. Bounded: a guest that keeps provoking one cannot grow us.
        self.loop_errors: list[str] = []
        self.loop_error_count = 0

    def qemu_args(self) -> list[str]:
        return [a for i, (c, f) in enumerate(zip(self.configs, self.files, strict=True))
                for a in device_qemu_args(i, c, f, self.hotplug)]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._buffers.append(FileBuffer(self.ram_path, self.memory))
        for path, p in self.pmem_spec:
            self._buffers.append(FileBuffer(path, p.file_size))
        for i, (config, files) in enumerate(zip(self.configs, self.files, strict=True)):
            dev = ApertureDevice(i, config, files.devmem, files.window, PCI_SLOT_BASE + 2 * i + 1,
                                 self.address_map, lock=self.lock, refresh_map=self.refresh_map)
            if self.hotplug:
                dev.window.set_direct(0)
            self.devices.append(dev)
            self.servers.append(IvshmemServer(files.socket, dev.ctl_fd, server_peer=abi.DOORBELL_PEER_ID))
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._loop, name="aperture-emulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, close servers, write back and close devices. Idempotent."""
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(10)
            self._thread = None
        for srv in self.servers:
            srv.close()
        self.servers = []
        for dev in self.devices:
            dev.close()
        for buf in self._buffers:
            buf.close()
        self._buffers = []
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._stop_fd, selectors.EVENT_READ, ("stop", None))
        for dev, srv in zip(self.devices, self.servers, strict=True):
            sel.register(srv.sock, selectors.EVENT_READ, ("accept", srv))
            for fd in srv.doorbells:
                sel.register(fd, selectors.EVENT_READ, ("bell", dev))
        while True:
            # Devices whose last round ended at its budget go again, but only after a select that can deliver
            # stop, a new doorbell (the other device) or a client event: nobody waits behind one guest's work.
            busy = [dev for dev in self.devices if dev.more_work]
            for dev in busy:
                try:
                    dev.process_ring(doorbell=False)
                except Exception as exc:  # noqa: BLE001 - as below
                    self._thread_error("ring", exc)
            for key, _ in sel.select(timeout=0 if any(dev.more_work for dev in self.devices) else 1.0):
                kind, obj = key.data
                try:
                    if kind == "stop":
                        sel.close()
                        return
                    if kind == "bell":
                        try:
                            os.eventfd_read(key.fd)
                        except BlockingIOError:
                            pass
                        obj.process_ring()
                    elif kind == "accept":
                        conn = obj.accept()
                        if conn is not None:
                            sel.register(conn, selectors.EVENT_READ, ("client", obj))
                    elif kind == "client":
                        if not key.fileobj.recv(64):  # type: ignore[union-attr]
                            sel.unregister(key.fileobj)
                            obj.drop_client()
                except Exception as exc:  # noqa: BLE001 - the emulator thread must survive anything
                    self._thread_error(kind, exc)
                    if kind == "client":
                        try:
                            sel.unregister(key.fileobj)
                        except (KeyError, ValueError):
                            pass

    def _thread_error(self, kind: str, exc: Exception) -> None:
        self.loop_error_count += 1
        if len(self.loop_errors) < LOOP_ERRORS_KEPT:
            self.loop_errors.append(f"{type(exc).__name__}: {exc}")
        if self.loop_error_count <= LOOP_ERRORS_LOGGED:
            self.log.error("emulator thread: %s event failed", kind, exc_info=exc)

    # ------------------------------------------------------------------ address map
    def invalidate_map(self) -> None:
        with self.lock:
            self._map = None

    def address_map(self) -> AddressMap | None:
        """Built from QMP on first use (BARs are assigned by the guest's firmware), then cached."""
        if self._map is None:
            qmp = self._qmp()
            if qmp is None:
                self.map_error = "QMP is not connected"
                return None
            try:
                self._map = self.build_map(qmp.memory_devices(), qmp.pci_devices())
                self.map_error = None
            except Exception as exc:  # noqa: BLE001 - QMP gone or a nonsensical map: DMA gets ENOMAP
                self.map_error = f"{type(exc).__name__}: {exc}"
                return None
        return self._map

    def refresh_map(self) -> AddressMap | None:
        """Rebuild the map from QMP, at most every MAP_REFRESH_INTERVAL (a guest that keeps sending unmapped
        addresses cannot turn the emulator thread into a QMP loop); else the current one."""
        with self.lock:
            now = time.monotonic()
            if now - self._map_refreshed_at >= MAP_REFRESH_INTERVAL:
                self._map_refreshed_at = now
                self._map = None
            return self.address_map()

    def build_map(self, memory_devices: list[Any], pci: list[Any]) -> AddressMap:
        ram = self._buffers[0].view
        regions = [Region(0, 0xA0000, "ram", "ram (<640K)", contiguous(ram[:0xA0000]))]  # then the VGA/BIOS hole
        for start, offset, length in ram_ranges(self.memory):
            first = 0x100000 if start == 0 else 0
            regions.append(Region(start + first, start + length, "ram", "ram" if start == 0 else "ram (above 4G)",
                                  contiguous(ram[offset + first : offset + length])))
        for md in memory_devices:
            idx = pmem_index(md.memdev)
            if md.kind != "nvdimm" or not 0 <= idx < len(self.pmem_spec):
                continue
            view = self._buffers[1 + idx].view
            regions.append(Region(md.addr, md.addr + md.size, "pmem", f"nvdimm{idx}", contiguous(view[: md.size])))
        win_ids = {win_id(i): dev for i, dev in enumerate(self.devices)}
        ctl_ids = {ctl_id(i) for i in range(len(self.devices))}
        for d in pci:
            for bar, (addr, size) in d.bars.items():
                if addr <= 0 or size <= 0 or addr >= 2**63:
                    continue
                if d.qdev_id in win_ids and bar == 2:
                    dev = win_ids[d.qdev_id]
                    regions.append(Region(addr, addr + size, "window", f"{d.qdev_id} BAR2", self._window(dev)))
                else:
                    kind = "register" if d.qdev_id in ctl_ids or bar == 0 else "bar"
                    regions.append(Region(addr, addr + size, kind, f"{d.qdev_id or d.address} BAR{bar}", None))
        return AddressMap(regions)

    @staticmethod
    def _window(dev: ApertureDevice) -> Callable[[int, int], list[memoryview]]:
        def resolve(offset: int, length: int) -> list[memoryview]:
            s = dev.config.slot
            for slot in range(offset // s, (offset + length - 1) // s + 1):
                if dev.window.slots[slot] is None:
                    raise DmaFault("EFAULT", f"slot {slot} of aperture{dev.index}'s window maps no page")
            return [dev.window.bar[offset : offset + length]]

        return resolve

    def stats(self) -> list[dict[str, object]]:
        return [d.stats() for d in self.devices]
