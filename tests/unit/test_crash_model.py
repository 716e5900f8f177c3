"""No data lost, stated and tested: 10^4 random operations on the real device model, killed with SIGKILL at
random points, checked against a reference model after every kill.

The promise (docs/device-abi.md, "What survives a crash"): a completed DMA is in its destination file (RAM,
NVDIMM, or device memory for a page not mapped in a slot); a page mapped in a slot reaches the device-memory
file when it is unmapped or remapped (a crash loses what was written into the slot since); the one operation in
flight at the crash is all-or-nothing per byte: each byte of its destination holds either the old or the new
value, and nothing outside its destination changed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

from aperture.emulator.config import DeviceConfig
from aperture.emulator.model.addrmap import AddressMap, Region, contiguous
from aperture.emulator.model.device import ApertureDevice
from aperture.emulator.model.memory import FileBuffer
from aperture.guest import abi
from aperture.guest.units import KiB, MiB

CFG = DeviceConfig(mem=4 * MiB, window=256 * KiB, slot=64 * KiB, hidden=((3840 * KiB, 4 * MiB),))
RAM_BASE, RAM_SIZE = 0x100000, 1 * MiB
PMEM_BASE, PMEM_SIZE = 0x10000000, 1 * MiB
TOTAL_OPS = 10_000
CRASHES = 20
SIZES = {"ram": RAM_SIZE, "pmem": PMEM_SIZE, "dev": CFG.mem}
BASES = {"ram": RAM_BASE, "pmem": PMEM_BASE}


def make_op(seed: int, i: int) -> tuple:
    """Operation ``i`` of the run: the same in the child that executes it and the parent that models it."""
    r = random.Random(seed * 1_000_003 + i)
    kind = r.choices(["map", "unmap", "winwrite", "dma"], weights=[2, 1, 3, 6])[0]
    if kind == "map":
        return ("map", r.randrange(CFG.nr_slots), r.randrange(CFG.nr_pages + 2))
    if kind == "unmap":
        return ("unmap", r.randrange(CFG.nr_slots))
    if kind == "winwrite":
        return ("winwrite", r.randrange(CFG.nr_slots), r.randrange(CFG.slot - 256), r.randbytes(r.randint(1, 256)))
    src_kind, dst_kind = r.choice(list(SIZES)), r.choice(list(SIZES))
    n = r.choice([r.randint(1, 4096), r.randint(1, 256 * KiB)])
    while True:
        a, b = r.randrange(SIZES[src_kind] - n + 1), r.randrange(SIZES[dst_kind] - n + 1)
        if not (src_kind == dst_kind and a < b + n and b < a + n):  # no overlapping copy within one buffer
            return ("dma", src_kind, a, dst_kind, b, n)


class Model:
    """What the files must hold: RAM and NVDIMM as written; device memory as the live (logical) copy and as the
    file holds it (a page mapped in a slot is only written back when it leaves the slot)."""

    def __init__(self, ram: bytes, pmem: bytes, dev: bytes) -> None:
        self.buf = {"ram": bytearray(ram), "pmem": bytearray(pmem), "dev": bytearray(dev)}
        self.file_dev = bytearray(dev)
        self.slots: dict[int, int] = {}

    def copy(self) -> Model:
        m = Model(self.buf["ram"], self.buf["pmem"], self.buf["dev"])
        m.file_dev, m.slots = bytearray(self.file_dev), dict(self.slots)
        return m

    def _writeback(self, page: int) -> None:
        s = CFG.slot
        self.file_dev[page * s : (page + 1) * s] = self.buf["dev"][page * s : (page + 1) * s]

    def apply(self, op: tuple) -> None:
        s = CFG.slot
        if op[0] == "map":
            _, slot, page = op
            if page >= CFG.nr_pages or CFG.page_hidden(page):
                return
            if page in self.slots.values():
                return  # EBUSY, or already in this very slot
            old = self.slots.get(slot)
            if old is not None:
                self._writeback(old)
            self.slots[slot] = page
        elif op[0] == "unmap":
            page = self.slots.pop(op[1], None)
            if page is not None:
                self._writeback(page)
        elif op[0] == "winwrite":
            _, slot, off, data = op
            if slot in self.slots:
                base = self.slots[slot] * s + off
                self.buf["dev"][base : base + len(data)] = data
        else:
            _, sk, a, dk, b, n = op
            self.buf[dk][b : b + n] = bytes(self.buf[sk][a : a + n])
            if dk == "dev":
                mapped = set(self.slots.values())
                for page in range(b // s, (b + n - 1) // s + 1):
                    if page not in mapped:
                        self._writeback(page)

    def files(self) -> dict[str, bytes]:
        return {"ram": bytes(self.buf["ram"]), "pmem": bytes(self.buf["pmem"]), "dev": bytes(self.file_dev)}


def _child(tmp: str, seed: int, start: int, end: int, log_fd: int) -> None:
    """Execute operations [start, end) on the real device model, logging each index once it completed."""
    base = Path(tmp)
    ram, pmem = FileBuffer(base / "ram", RAM_SIZE), FileBuffer(base / "pmem", PMEM_SIZE)
    amap = AddressMap([Region(RAM_BASE, RAM_BASE + RAM_SIZE, "ram", "ram", contiguous(ram.view)),
                       Region(PMEM_BASE, PMEM_BASE + PMEM_SIZE, "pmem", "nvdimm0", contiguous(pmem.view))])
    dev = ApertureDevice(0, CFG, base / "devmem", base / "window", 0x11, lambda: amap)
    ctl = dev.ctl
    sq = cq = 0
    for i in range(start, end):
        op = make_op(seed, i)
        if op[0] == "winwrite":
            _, slot, off, data = op
            if dev.window.slots[slot] is not None:  # the guest writes only through a mapped slot
                at = slot * CFG.slot + off
                dev.window_file.view[at : at + len(data)] = data
        else:
            if op[0] == "map":
                desc = abi.Descriptor(abi.OP_MAP, 0, i, op[1], 0, op[2], 0, 0, 0, 0, 0)
            elif op[0] == "unmap":
                desc = abi.Descriptor(abi.OP_UNMAP, 0, i, op[1], 0, 0, 0, 0, 0, 0, 0)
            else:
                _, sk, a, dk, b, n = op
                flags = (abi.DMA_SRC_LOCAL if sk == "dev" else 0) | (abi.DMA_DST_LOCAL if dk == "dev" else 0)
                desc = abi.Descriptor(abi.OP_DMA, flags, i, 0, 0, 0, a + BASES.get(sk, 0), b + BASES.get(dk, 0),
                                      n, 0, 0)
            off = abi.reg("SQ") + (sq % abi.RING_ENTRIES) * abi.DESC_SIZE
            ctl.buf[off : off + abi.DESC_SIZE] = desc.pack()
            sq = (sq + 1) & 0xFFFFFFFF
            ctl.set("SQ_HEAD", sq)
            dev.process_ring()
            cq = ctl.get("CQ_HEAD")
            ctl.set("CQ_TAIL", cq)
        os.write(log_fd, i.to_bytes(4, "little"))
    os.write(log_fd, (0xFFFFFFFF).to_bytes(4, "little"))
    time.sleep(60)  # wait for the kill, like a process in the middle of something else


def _check(name: str, actual: bytes, before: bytes, after: bytes) -> None:
    """Each byte is the old or the new value of the operation in flight; outside what it changes, the old."""
    if actual in (before, after):
        return
    diff = [i for i in range(len(before)) if before[i] != after[i]]
    lo, hi = (diff[0], diff[-1] + 1) if diff else (0, 0)
    assert actual[:lo] == before[:lo] and actual[hi:] == before[hi:], f"{name}: changed outside the op in flight"
    bad = [i for i in range(lo, hi) if actual[i] not in (before[i], after[i])]
    assert not bad, f"{name}: {len(bad)} bytes hold neither the old nor the new value (first at {bad[0]:#x})"


def test_no_data_lost_across_random_kills(tmp_path: Path) -> None:
    seed = 20261128
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(seed)
    model = Model(bytes(RAM_SIZE), bytes(PMEM_SIZE), bytes(CFG.mem))
    next_op, kills, mid_op, checked_bytes = 0, 0, 0, 0
    per_round = TOTAL_OPS // CRASHES
    while next_op < TOTAL_OPS:
        end = min(next_op + per_round, TOTAL_OPS)
        read_fd, write_fd = os.pipe()
        child = ctx.Process(target=_child, args=(str(tmp_path), seed, next_op, end, write_fd))
        child.start()
        os.close(write_fd)
        target = rnd.randrange(next_op, end + 1)  # kill once this many ops have completed (or at the end)
        done = next_op - 1
        finished = False
        buf = b""
        while not finished and done < target - 1:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 4:
                value, buf = int.from_bytes(buf[:4], "little"), buf[4:]
                finished = finished or value == 0xFFFFFFFF
                done = done if value == 0xFFFFFFFF else value
        time.sleep(rnd.random() * 0.002)  # land somewhere in the next operation, or between two
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills += 1
        rest = b""
        while chunk := os.read(read_fd, 65536):
            rest += chunk
        os.close(read_fd)
        for k in range(0, len(buf + rest) - 3, 4):
            value = int.from_bytes((buf + rest)[k : k + 4], "little")
            done = done if value == 0xFFFFFFFF else max(done, value)
        for i in range(next_op, done + 1):
            model.apply(make_op(seed, i))
        in_flight = done + 1 if done + 1 < end else None
        after = model.copy()
        if in_flight is not None:
            after.apply(make_op(seed, in_flight))
        actual = {"ram": (tmp_path / "ram").read_bytes(), "pmem": (tmp_path / "pmem").read_bytes(),
                  "dev": (tmp_path / "devmem").read_bytes()}
        before_files, after_files = model.files(), after.files()
        for name in actual:
            _check(name, actual[name], before_files[name], after_files[name])
            checked_bytes += len(actual[name])
        mid_op += int(in_flight is not None and actual != before_files and actual != after_files)
        # The files are the truth from here on: a new device starts with no slot mapped.
        model = Model(actual["ram"], actual["pmem"], actual["dev"])
        next_op = (in_flight + 1) if in_flight is not None else end
    assert next_op >= TOTAL_OPS and kills >= CRASHES
    print(f"{TOTAL_OPS} operations, {kills} kills ({mid_op} landed mid-operation), "
          f"{checked_bytes >> 20} MiB compared with the model")
