"""The device model without QEMU: rings, window invariants, DMA validation, a reference model, fuzzing."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from aperture.emulator.config import DeviceConfig
from aperture.emulator.model.addrmap import AddressMap, DmaFault, Region, contiguous
from aperture.emulator.model.device import ApertureDevice
from aperture.emulator.model.memory import FileBuffer
from aperture.guest import abi
from aperture.guest.units import KiB, MiB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SMALL = DeviceConfig(mem=1 * MiB, window=64 * KiB, slot=16 * KiB, hidden=((960 * KiB, 1 * MiB),))
RAM_BASE, RAM_SIZE = 0x10000, 256 * KiB
HOLE = 0x8000000


class Rig:
    """One device, a RAM buffer at RAM_BASE, a register region, and a canary file nothing may touch."""

    def __init__(self, tmp: Path, config: DeviceConfig = SMALL) -> None:
        self.ram = FileBuffer(tmp / "ram", RAM_SIZE)
        self.canary_path = tmp / "canary"
        self.canary_path.write_bytes(b"\xAA" * 4096)
        self.map = AddressMap([Region(RAM_BASE, RAM_BASE + RAM_SIZE, "ram", "ram", contiguous(self.ram.view)),
                               Region(0x100000, 0x101000, "register", "ctl BAR", None)])
        self.dev = ApertureDevice(0, config, tmp / "devmem", tmp / "window", 0x11, lambda: self.map)
        self.sq = 0
        self.cq = 0

    def submit(self, *descs: abi.Descriptor) -> list[tuple[int, int, int]]:
        ctl = self.dev.ctl
        for d in descs:
            off = abi.reg("SQ") + (self.sq % abi.RING_ENTRIES) * abi.DESC_SIZE
            ctl.buf[off : off + abi.DESC_SIZE] = d.pack()
            self.sq = (self.sq + 1) & 0xFFFFFFFF
        ctl.set("SQ_HEAD", self.sq)
        self.dev.process_ring()
        out = []
        while self.cq != ctl.get("CQ_HEAD"):
            off = abi.reg("CQ") + (self.cq % abi.RING_ENTRIES) * abi.COMPL_SIZE
            tag, status, opcode, result = abi.COMPL.unpack_from(ctl.buf, off)
            out.append((tag, status, result))
            self.cq = (self.cq + 1) & 0xFFFFFFFF
            ctl.set("CQ_TAIL", self.cq)
        return out

    def one(self, opcode: int, **kw: int) -> tuple[int, int]:
        fields = dict(flags=0, tag=1, slot=0, reserved0=0, page=0, src=0, dst=0, length=0, reserved1=0, reserved2=0)
        fields.update(kw)
        (_, status, result), = self.submit(abi.Descriptor(opcode=opcode, **fields))
        return status, result

    def close(self) -> None:
        self.dev.close()
        self.ram.close()


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.close()


STATUS = abi.STATUS_CODES


def test_control_memory_advertises_the_device(rig: Rig) -> None:
    ctl = rig.dev.ctl
    assert ctl.get("MAGIC") == abi.MAGIC
    assert ctl.get("ABI_VERSION") >> 16 == abi.ABI_MAJOR
    assert ctl.get("NR_SLOTS") == 4 and ctl.get("SLOT_SIZE") == 16 * KiB
    assert ctl.get("STATUS") & abi.STATUS_READY


def test_map_makes_the_slot_the_live_copy_and_remap_writes_back(rig: Rig) -> None:
    s = SMALL.slot
    assert rig.one(abi.OP_MAP, slot=1, page=3) == (STATUS["OK"], 0)
    assert rig.dev.ctl.slot_entry(1) == 4
    rig.dev.window_file.view[s : s + 5] = b"hello"  # the guest writes through the window
    assert bytes(rig.dev.devmem.view[3 * s : 3 * s + 5]) == bytes(5)  # not yet in device memory
    assert rig.one(abi.OP_MAP, slot=1, page=4)[0] == STATUS["OK"]  # remap: write back page 3, load page 4
    assert bytes(rig.dev.devmem.view[3 * s : 3 * s + 5]) == b"hello"
    assert bytes(rig.dev.window_file.view[s : s + 5]) == bytes(5)
    assert rig.dev.ctl.get("GENERATION") % 2 == 0
    assert rig.one(abi.OP_MAP, slot=2, page=3)[0] == STATUS["OK"]
    assert bytes(rig.dev.window_file.view[2 * s : 2 * s + 5]) == b"hello"


def test_map_refusals(rig: Rig) -> None:
    assert rig.one(abi.OP_MAP, slot=4, page=0)[0] == STATUS["ERANGE"]
    assert rig.one(abi.OP_MAP, slot=0, page=64)[0] == STATUS["ERANGE"]
    assert rig.one(abi.OP_MAP, slot=0, page=60)[0] == STATUS["EACCES"]  # 960K / 16K: hidden
    assert rig.one(abi.OP_MAP, slot=0, page=1)[0] == STATUS["OK"]
    assert rig.one(abi.OP_MAP, slot=1, page=1)[0] == STATUS["EBUSY"]
    assert rig.one(abi.OP_MAP, slot=0, page=1, reserved1=5)[0] == STATUS["EINVAL"]
    assert rig.one(99)[0] == STATUS["EINVAL"]


def test_dma_resolves_and_validates(rig: Rig) -> None:
    rig.ram.view[0:4] = b"abcd"
    assert rig.one(abi.OP_DMA, src=RAM_BASE, dst=0x100, length=4, flags=abi.DMA_DST_LOCAL) == (STATUS["OK"], 4)
    assert bytes(rig.dev.devmem.view[0x100:0x104]) == b"abcd"
    # the device's own DMA reaches hidden memory
    assert rig.one(abi.OP_DMA, src=RAM_BASE, dst=960 * KiB, length=4, flags=abi.DMA_DST_LOCAL)[0] == STATUS["OK"]
    cases = {
        "hole": dict(src=RAM_BASE, dst=HOLE, length=4),
        "register": dict(src=RAM_BASE, dst=0x100000, length=4),
        "cross": dict(src=RAM_BASE + RAM_SIZE - 2, dst=0, length=4, flags=abi.DMA_DST_LOCAL),
        "zero": dict(src=RAM_BASE, dst=RAM_BASE, length=0),
        "big": dict(src=0, dst=0, length=abi.MAX_DMA_LENGTH + 1, flags=3),
        "local range": dict(src=SMALL.mem - 2, dst=RAM_BASE, length=4, flags=abi.DMA_SRC_LOCAL),
        "flags": dict(src=RAM_BASE, dst=RAM_BASE, length=4, flags=0x40),
    }
    expect = {"hole": "EFAULT", "register": "EFAULT", "cross": "ECROSS", "zero": "EINVAL", "big": "ETOOBIG",
              "local range": "ERANGE", "flags": "EINVAL"}
    for name, kw in cases.items():
        assert rig.one(abi.OP_DMA, **kw)[0] == STATUS[expect[name]], name


def test_dma_into_a_mapped_page_lands_in_its_slot(rig: Rig) -> None:
    s = SMALL.slot
    rig.one(abi.OP_MAP, slot=2, page=5)
    rig.ram.view[0:3] = b"xyz"
    rig.one(abi.OP_DMA, src=RAM_BASE, dst=5 * s + 10, length=3, flags=abi.DMA_DST_LOCAL)
    assert bytes(rig.dev.window_file.view[2 * s + 10 : 2 * s + 13]) == b"xyz"


def test_dma_list_is_all_or_nothing(rig: Rig) -> None:
    table = abi.LIST_ENTRY.pack(RAM_BASE + 4096, RAM_BASE + 8192, 16, 0, 0) + \
        abi.LIST_ENTRY.pack(RAM_BASE + 4096, HOLE, 16, 0, 0)
    rig.ram.view[0 : len(table)] = table
    rig.ram.view[4096 : 4096 + 16] = b"S" * 16
    assert rig.one(abi.OP_DMA_LIST, src=RAM_BASE, length=2) == (STATUS["EFAULT"], 1)
    assert bytes(rig.ram.view[8192 : 8192 + 16]) == bytes(16)
    assert rig.one(abi.OP_DMA_LIST, src=RAM_BASE, length=1) == (STATUS["OK"], 16)
    assert bytes(rig.ram.view[8192 : 8192 + 16]) == b"S" * 16
    assert rig.one(abi.OP_DMA_LIST, src=RAM_BASE, length=abi.MAX_LIST_ENTRIES + 1)[0] == STATUS["ETOOBIG"]


def test_no_address_map_gives_enomap(tmp_path: Path) -> None:
    dev = ApertureDevice(0, SMALL, tmp_path / "d", tmp_path / "w", 0x11, lambda: None)
    try:
        assert dev.execute(abi.Descriptor(abi.OP_DMA, 0, 1, 0, 0, 0, 0, 0, 4, 0, 0).pack())[0] == STATUS["ENOMAP"]
    finally:
        dev.close()


def test_garbage_ring_indices_are_flagged_not_trusted(rig: Rig) -> None:
    rig.dev.ctl.set("SQ_HEAD", 100000)
    assert rig.dev.process_ring() == 0
    assert rig.dev.ctl.get("STATUS") & abi.STATUS_RING_ERROR
    assert rig.dev.ctl.get("SQ_TAIL") == 100000
    rig.sq = 100000
    rig.dev.ctl.set("CQ_TAIL", 12345)  # garbage consumer index
    assert rig.one(abi.OP_NOP)[0] == STATUS["OK"]


def _count_foreign_values(fd: int, offset: int, allowed: tuple[int, ...], stop: Any, counter: Any) -> None:
    """Child process: poll one u32 of the control memory like the guest does; count values never written."""
    view = memoryview(mmap.mmap(fd, abi.CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)).cast("I")
    seen = 0
    while not stop.is_set():
        for _ in range(10000):
            if view[offset // 4] not in allowed:
                seen += 1
    counter.value = seen


def test_guest_never_sees_a_register_half_written(rig: Rig) -> None:
    """A concurrent reader of CQ_HEAD only ever sees values the host wrote (struct.pack_into zero-fills first:
    a guest polling CQ_HEAD then takes a transient 0 for a new completion and the ring desynchronises)."""
    ctx = multiprocessing.get_context("fork")
    stop, counter = ctx.Event(), ctx.Value("Q", 0)
    values = (0x1234_5678, 0x1234_5679)
    rig.dev.ctl.set("CQ_HEAD", values[0])
    reader = ctx.Process(target=_count_foreign_values,
                         args=(rig.dev.ctl_fd, abi.reg("CQ_HEAD"), values, stop, counter))
    reader.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for i in range(10000):
                rig.dev.ctl.set("CQ_HEAD", values[i & 1])
    finally:
        stop.set()
        reader.join(10)
    assert reader.exitcode == 0
    assert counter.value == 0


def test_full_completion_ring_waits_for_the_guest(rig: Rig) -> None:
    ctl = rig.dev.ctl
    nop = abi.Descriptor(abi.OP_NOP, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0).pack()
    for i in range(abi.RING_ENTRIES):
        off = abi.reg("SQ") + i * abi.DESC_SIZE
        ctl.buf[off : off + abi.DESC_SIZE] = nop
    ctl.set("SQ_HEAD", abi.RING_ENTRIES)
    assert rig.dev.process_ring() == abi.RING_ENTRIES
    ctl.set("SQ_HEAD", abi.RING_ENTRIES + 1)  # CQ full (guest consumed nothing)
    assert rig.dev.process_ring() == 0
    ctl.set("CQ_TAIL", 1)
    assert rig.dev.process_ring() == 1


def test_device_memory_persists_across_close(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.one(abi.OP_MAP, slot=0, page=2)
    r.dev.window_file.view[0:4] = b"keep"
    r.close()  # writes the mapped slot back
    r2 = Rig(tmp_path)
    assert bytes(r2.dev.devmem.view[2 * SMALL.slot : 2 * SMALL.slot + 4]) == b"keep"
    r2.close()


# ---------------------------------------------------------------- reference model (hypothesis)
ops = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 5), st.integers(0, 65)),
    st.tuples(st.just("unmap"), st.integers(0, 5)),
    st.tuples(st.just("winwrite"), st.integers(0, 3), st.integers(0, SMALL.slot - 1),
              st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("ram2dev"), st.integers(0, RAM_SIZE - 1), st.integers(0, SMALL.mem - 1), st.integers(1, 40000)),
    st.tuples(st.just("dev2ram"), st.integers(0, SMALL.mem - 1), st.integers(0, RAM_SIZE - 1), st.integers(1, 40000)),
    st.tuples(st.just("dev2dev"), st.integers(0, SMALL.mem - 1), st.integers(0, SMALL.mem - 1), st.integers(1, 40000)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=30))
def test_matches_reference_model(tmp_path_factory: pytest.TempPathFactory, sequence: list[tuple]) -> None:
    tmp = tmp_path_factory.mktemp("ref")
    rig = Rig(tmp)
    dev_ref = bytearray(SMALL.mem)  # logical device memory (whatever copy is live)
    ram_ref = bytearray(RAM_SIZE)
    slots: dict[int, int] = {}
    try:
        for op in sequence:
            kind = op[0]
            if kind == "map":
                _, slot, page = op
                status = rig.one(abi.OP_MAP, slot=slot, page=page)[0]
                if slot >= SMALL.nr_slots or page >= SMALL.nr_pages:
                    want = "ERANGE"
                elif SMALL.page_hidden(page):
                    want = "EACCES"
                elif page in slots.values() and slots.get(slot) != page:
                    want = "EBUSY"
                else:
                    want = "OK"
                    slots[slot] = page
                assert status == STATUS[want], op
            elif kind == "unmap":
                status = rig.one(abi.OP_UNMAP, slot=op[1])[0]
                assert status == STATUS["OK" if op[1] < SMALL.nr_slots else "ERANGE"]
                slots.pop(op[1], None)
            elif kind == "winwrite":
                _, slot, off, data = op
                if slot not in slots:
                    continue
                off = min(off, SMALL.slot - len(data))
                base = slot * SMALL.slot + off
                rig.dev.window_file.view[base : base + len(data)] = data
                page_off = slots[slot] * SMALL.slot + off
                dev_ref[page_off : page_off + len(data)] = data
            else:
                _, a, b, n = op
                src_size, dst_size = {"ram2dev": (RAM_SIZE, SMALL.mem), "dev2ram": (SMALL.mem, RAM_SIZE),
                                      "dev2dev": (SMALL.mem, SMALL.mem)}[kind]
                flags = {"ram2dev": abi.DMA_DST_LOCAL, "dev2ram": abi.DMA_SRC_LOCAL, "dev2dev": 3}[kind]
                src = a + (RAM_BASE if kind == "ram2dev" else 0)
                dst = b + (RAM_BASE if kind == "dev2ram" else 0)
                status, result = rig.one(abi.OP_DMA, src=src, dst=dst, length=n, flags=flags)
                if a + n > src_size or b + n > dst_size:
                    assert status in (STATUS["ECROSS"], STATUS["ERANGE"]), op
                    continue
                assert (status, result) == (STATUS["OK"], n), op
                sbuf = ram_ref if kind == "ram2dev" else dev_ref
                dbuf = ram_ref if kind == "dev2ram" else dev_ref
                dbuf[b : b + n] = bytes(sbuf[a : a + n])
            # the device's view of every byte equals the model's
            live = b"".join(bytes(v) for v in rig.dev.local_segments(0, SMALL.mem))
            assert live == bytes(dev_ref)
            assert bytes(rig.ram.view) == bytes(ram_ref)
    finally:
        rig.close()
    assert Path(tmp / "devmem").read_bytes() == bytes(dev_ref)  # after write-back, memory is the truth


def test_ram_model_seeded(tmp_path: Path) -> None:
    """RAM writes from the 'guest' side are seen by DMA (the reference model starts from zeros)."""
    rig = Rig(tmp_path)
    try:
        rig.ram.view[100:104] = b"ramm"
        rig.one(abi.OP_DMA, src=RAM_BASE + 100, dst=0, length=4, flags=abi.DMA_DST_LOCAL)
        assert bytes(rig.dev.devmem.view[0:4]) == b"ramm"
    finally:
        rig.close()


# ---------------------------------------------------------------- fuzzing
def test_fuzz_rings_and_descriptors(tmp_path: Path) -> None:
    """Random bytes everywhere the guest can write: no exception, bounded work, nothing outside our buffers."""
    rig = Rig(tmp_path)
    rng = random.Random(1234)
    canary_before = rig.canary_path.read_bytes()
    try:
        t0 = time.monotonic()
        for _ in range(300):
            ctl = rig.dev.ctl
            # garbage descriptors: some structured (valid opcodes, wild numbers), some pure noise
            for i in range(abi.RING_ENTRIES):
                off = abi.reg("SQ") + i * abi.DESC_SIZE
                if rng.random() < 0.5:
                    raw = bytearray(rng.randbytes(abi.DESC_SIZE))
                    raw[0:2] = rng.choice([0, 1, 2, 3, 4, 5, 0xFFFF]).to_bytes(2, "little")
                    if rng.random() < 0.5:
                        raw[8:64] = bytes(56)
                        raw[16:24] = rng.randrange(0, 80).to_bytes(8, "little")
                        raw[24:32] = (RAM_BASE + rng.randrange(-8, RAM_SIZE + 8)).to_bytes(8, "little", signed=True)
                        raw[32:40] = rng.randrange(0, SMALL.mem + 8).to_bytes(8, "little")
                        raw[40:48] = rng.randrange(0, 70000).to_bytes(8, "little")
                        raw[2:4] = rng.randrange(0, 4).to_bytes(2, "little")
                    ctl.buf[off : off + abi.DESC_SIZE] = bytes(raw)
                else:
                    ctl.buf[off : off + abi.DESC_SIZE] = rng.randbytes(abi.DESC_SIZE)
            for reg in ("SQ_HEAD", "CQ_TAIL", "SQ_TAIL", "CQ_HEAD", "GENERATION"):
                if rng.random() < 0.3:
                    ctl.set(reg, rng.getrandbits(32))
            rig.ram.view[0:4096] = rng.randbytes(4096)  # garbage DMA lists
            done = rig.dev.process_ring()
            assert 0 <= done <= 4 * abi.RING_ENTRIES
            ctl.set("CQ_TAIL", ctl.get("CQ_HEAD"))
        assert time.monotonic() - t0 < 60
    finally:
        rig.close()
    assert rig.canary_path.read_bytes() == canary_before
    assert sorted(os.listdir(tmp_path)) == ["canary", "devmem", "ram", "window"]
    assert (tmp_path / "devmem").stat().st_size == SMALL.mem
    assert (tmp_path / "window").stat().st_size == SMALL.window


def test_an_overlap_refuses_only_the_overlapped_range() -> None:
    """A guest that programs one BAR on top of another (or of RAM): DMA into the overlap is refused, every other
    address of both still resolves — to the right bytes (the pieces keep their offsets)."""
    ram, bar = memoryview(bytearray(range(100))), memoryview(bytearray(b"B" * 30))
    m = AddressMap([Region(0, 100, "ram", "ram", contiguous(ram)), Region(40, 70, "bar", "win0", contiguous(bar))])
    assert [(r.start, r.end, r.kind) for r in m.regions] == [(0, 40, "ram"), (40, 70, "conflict"), (70, 100, "ram")]
    assert bytes(m.resolve(10, 5)[0]) == bytes(range(10, 15))
    assert bytes(m.resolve(75, 5)[0]) == bytes(range(75, 80))  # after the overlap: RAM's own bytes at 75
    with pytest.raises(DmaFault) as err:
        m.resolve(45, 4)
    assert err.value.status == abi.STATUS_CODES["EFAULT"] and "ram over win0" in err.value.why
    with pytest.raises(DmaFault):
        m.resolve(35, 10)  # crosses into the conflict
    with pytest.raises(DmaFault):
        m.resolve(2**64, 1)


def test_retarget_moving_a_page_between_slots_keeps_its_data(rig: Rig) -> None:
    """Regression: {A: x, B: page-A-had} in one call must write A back before loading B."""
    s = SMALL.slot
    rig.dev.retarget({0: 7})
    rig.dev.window_file.view[0:4] = b"live"
    rig.dev.retarget({1: 7, 0: 8})  # B takes A's page while A moves on
    assert bytes(rig.dev.window_file.view[s : s + 4]) == b"live"
    assert rig.dev.window.page_slot == {7: 1, 8: 0}
    rig.dev.retarget({1: None, 0: None})
    assert rig.dev.window.page_slot == {}
    assert bytes(rig.dev.devmem.view[7 * s : 7 * s + 4]) == b"live"


def test_retarget_refuses_double_mapping(rig: Rig) -> None:
    rig.dev.retarget({0: 3})
    with pytest.raises(DmaFault):
        rig.dev.retarget({1: 3})
    with pytest.raises(DmaFault):
        rig.dev.retarget({1: 5, 2: 5})
    with pytest.raises(DmaFault):
        rig.dev.retarget({1: 60})  # hidden


def test_unsafe_announce_moves_the_table_ahead_of_the_data(rig: Rig) -> None:
    """The negative control's torn state: the table names the new page, the slot still holds the old one's
    bytes and the generation did not move; the later retarget brings the data and loses nothing."""
    s = SMALL.slot
    rig.dev.retarget({0: 2})
    rig.dev.window_file.view[0:3] = b"two"
    rig.dev.devmem.view[5 * s : 5 * s + 4] = b"five"
    gen = rig.dev.ctl.get("GENERATION")
    rig.dev.window.announce({0: 5})
    assert rig.dev.ctl.slot_entry(0) == 6 and rig.dev.ctl.get("GENERATION") == gen
    assert bytes(rig.dev.window_file.view[0:3]) == b"two"  # what a guest reading now sees: page 2's data
    rig.dev.retarget({0: 5}, seqlock=False)
    assert bytes(rig.dev.window_file.view[0:4]) == b"five" and rig.dev.ctl.slot_entry(0) == 6
    assert bytes(rig.dev.devmem.view[2 * s : 2 * s + 3]) == b"two"


def test_direct_window_is_device_memory(rig: Rig) -> None:
    """Hotplug topology: the window is device memory at an offset; slots are fixed; guest MAP is refused."""
    s = SMALL.slot
    rig.dev.retarget({0: 2})
    rig.dev.window_file.view[0:3] = b"old"  # live in a copied slot
    rig.dev.window.begin_transition()
    assert rig.dev.ctl.get("GENERATION") % 2 == 1
    assert all(rig.dev.ctl.slot_entry(k) == 0 for k in range(SMALL.nr_slots))
    rig.dev.window.set_direct(4 * s)
    assert rig.dev.ctl.get("GENERATION") % 2 == 0
    assert bytes(rig.dev.devmem.view[2 * s : 2 * s + 3]) == b"old"  # written back before going direct
    assert [rig.dev.ctl.slot_entry(k) for k in range(SMALL.nr_slots)] == [5, 6, 7, 8]
    rig.dev.window.bar[0:2] = b"hi"  # the window IS device memory now
    assert bytes(rig.dev.devmem.view[4 * s : 4 * s + 2]) == b"hi"
    assert rig.one(abi.OP_MAP, slot=0, page=9)[0] == STATUS["EINVAL"]
    assert rig.one(abi.OP_UNMAP, slot=0)[0] == STATUS["EINVAL"]
    with pytest.raises(DmaFault):
        rig.dev.retarget({0: 9})
    rig.ram.view[0:2] = b"ok"
    assert rig.one(abi.OP_DMA, src=RAM_BASE, dst=5 * s, length=2, flags=abi.DMA_DST_LOCAL)[0] == STATUS["OK"]
    assert bytes(rig.dev.window.bar[s : s + 2]) == b"ok"


def test_random_moves_never_double_map_on_a_crowded_device(tmp_path: Path) -> None:
    """Regression: fewer exposable pages than slots; random remaps must never put a page in two slots."""
    from aperture.qmp_client.remap import random_moves

    crowded = DeviceConfig(mem=64 * KiB, window=64 * KiB, slot=16 * KiB, hidden=((48 * KiB, 64 * KiB),))
    rig = Rig(tmp_path, crowded)
    rng = random.Random(7)
    try:
        for _ in range(500):
            rig.dev.retarget(random_moves(rig.dev, rng, max_slots=3))
            live = [p for p in rig.dev.window.slots if p is not None]
            assert len(live) == len(set(live)) and all(p < 3 for p in live)
    finally:
        rig.close()


def test_address_map_follows_guest_ram_above_4g(tmp_path: Path) -> None:
    """A 3 GiB guest: [1M, 2G) is the file's first 2 GiB, [4G, 5G) its last; the 32-bit hole is nothing."""
    from aperture.emulator.model.memory import FileBuffer
    from aperture.emulator.model.service import DeviceService

    ram = tmp_path / "ram"
    service = DeviceService((), [], ram=ram, memory=3 << 30, pmem=[], qmp=lambda: None)
    service._buffers.append(FileBuffer(ram, 3 << 30))
    amap = service.build_map([], [])
    amap.resolve((4 << 30) + 4096, 4)[0][:] = b"high"
    amap.resolve(0x200000, 3)[0][:] = b"low"
    with pytest.raises(DmaFault):
        amap.resolve(3 << 30, 8)  # the PCI hole
    with pytest.raises(DmaFault):
        amap.resolve((2 << 30) - 2, 4)  # crosses the end of low RAM
    with pytest.raises(DmaFault):
        amap.resolve(5 << 30, 1)  # past the end of RAM
    service._buffers[0].close()
    with open(ram, "rb") as f:
        f.seek((2 << 30) + 4096)
        assert f.read(4) == b"high"
        f.seek(0x200000)
        assert f.read(3) == b"low"


def test_dma_rebuilds_a_stale_address_map_once_per_fault() -> None:
    """The guest moved a BAR after the map was built: an address the map cannot place gets one rebuild."""
    from aperture.emulator.model.addrmap import AddressMap, DmaFault, Region, contiguous
    from aperture.emulator.model.dma import DmaEngine

    ram = memoryview(bytearray(0x10000))
    stale = AddressMap([Region(0, 0x8000, "ram", "ram", contiguous(ram[:0x8000]))])
    fresh = AddressMap([Region(0, 0x10000, "ram", "ram", contiguous(ram))])
    calls = []

    def refresh() -> AddressMap:
        calls.append(1)
        return fresh

    engine = DmaEngine(lambda: stale, lambda off, n: [ram[off:off + n]], refresh)
    ram[0x9000:0x9004] = b"abcd"
    assert engine.transfer(0x9000, 0x100, 4, 0) == 4 and bytes(ram[0x100:0x104]) == b"abcd"
    assert calls == [1] and engine.map_refreshes == 1
    with pytest.raises(DmaFault):  # really unmapped: still refused after the rebuild
        engine.transfer(0x20000, 0x100, 4, 0)
    no_refresh = DmaEngine(lambda: stale, lambda off, n: [ram[off:off + n]])
    with pytest.raises(DmaFault):
        no_refresh.transfer(0x9000, 0x100, 4, 0)


def test_emulator_thread_errors_are_bounded_and_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A guest that keeps crashing the device thread: the thread survives, keeps the first few errors, counts all,
    logs them, and does not grow."""
    import logging

    from aperture.emulator.model import service as service_mod
    from aperture.emulator.model.service import DeviceService
    from aperture.emulator.runpaths import DeviceFiles

    def boom(self: ApertureDevice) -> None:
        raise RuntimeError("guest-provoked failure")

    monkeypatch.setattr(ApertureDevice, "process_ring", boom)
    files = [DeviceFiles(tmp_path / "devmem0.img", tmp_path / "win0", tmp_path / "ap0.sock")]
    svc = DeviceService([DeviceConfig(mem=32 * MiB, window=4 * MiB, slot=1 * MiB, hidden=())], files,
                        ram=tmp_path / "ram", memory=16 * MiB, pmem=[], qmp=lambda: None,
                        log=(vm_log := logging.Logger("aperture.vm.test")))
    vm_log.addHandler(caplog.handler)  # the VM's own logger: errors reach it, nothing global is touched
    svc.start()
    try:
        for _ in range(3 * service_mod.LOOP_ERRORS_KEPT):
            count = svc.loop_error_count
            os.eventfd_write(svc.servers[0].doorbells[0], 1)
            deadline = time.monotonic() + 5
            while svc.loop_error_count == count and time.monotonic() < deadline:
                time.sleep(0.005)
        assert svc.loop_error_count == 3 * service_mod.LOOP_ERRORS_KEPT
        assert len(svc.loop_errors) == service_mod.LOOP_ERRORS_KEPT
        assert svc.loop_errors[0] == "RuntimeError: guest-provoked failure"
        assert svc._thread is not None and svc._thread.is_alive()
        assert "guest-provoked failure" in caplog.text
    finally:
        svc.stop()


def test_nop_with_flags_is_refused(rig: Rig) -> None:
    assert rig.one(abi.OP_NOP, flags=1)[0] == STATUS["EINVAL"]
    assert rig.one(abi.OP_NOP)[0] == STATUS["OK"]


def test_a_dma_list_above_max_list_bytes_is_too_big_and_writes_nothing(tmp_path: Path) -> None:
    """5 device-local entries of 64 MiB: 320 MiB > MAX_LIST_BYTES, refused at entry 4 before a byte moves."""
    r = Rig(tmp_path, DeviceConfig(mem=256 * MiB, window=16 * MiB, slot=2 * MiB, hidden=()))
    try:
        local = abi.DMA_SRC_LOCAL | abi.DMA_DST_LOCAL
        table = b"".join(abi.LIST_ENTRY.pack(0, 128 * MiB, 64 * MiB, local, 0) for _ in range(5))
        r.ram.view[0:len(table)] = table
        assert 5 * 64 * MiB > abi.MAX_LIST_BYTES >= 4 * 64 * MiB
        assert r.one(abi.OP_DMA_LIST, src=RAM_BASE, length=5) == (STATUS["ETOOBIG"], 4)
        assert r.dev.dma.bytes_copied == 0
        assert r.one(abi.OP_DMA_LIST, src=RAM_BASE, length=4) == (STATUS["OK"], 4 * 64 * MiB)
    finally:
        r.close()


def test_work_is_served_in_bounded_rounds(tmp_path: Path) -> None:
    """A ring full of DMA_LISTs of MAX_LIST_BYTES: each round stops at ROUND_BYTES and says more work is left;
    rounds (not one doorbell) finish the ring."""
    config = DeviceConfig(mem=256 * MiB, window=16 * MiB, slot=2 * MiB, hidden=())
    r = Rig(tmp_path, config)
    try:
        local = abi.DMA_SRC_LOCAL | abi.DMA_DST_LOCAL
        entry = 64 * MiB
        table = b"".join(abi.LIST_ENTRY.pack(0, 128 * MiB, entry, local, 0) for _ in range(4))  # 256 MiB a list
        r.ram.view[0:len(table)] = table
        ctl = r.dev.ctl
        n = 6
        for i in range(n):
            d = abi.Descriptor(abi.OP_DMA_LIST, 0, i, 0, 0, 0, RAM_BASE, 0, 4, 0, 0)
            off = abi.reg("SQ") + (i % abi.RING_ENTRIES) * abi.DESC_SIZE
            ctl.buf[off : off + abi.DESC_SIZE] = d.pack()
        ctl.set("SQ_HEAD", n)
        rounds = 0
        r.dev.process_ring()
        rounds += 1
        while r.dev.more_work:
            before = r.dev.dma.bytes_copied
            r.dev.process_ring(doorbell=False)
            assert r.dev.dma.bytes_copied - before <= abi.ROUND_BYTES
            rounds += 1
        assert ctl.get("COMPLETED") == n and rounds == n and ctl.get("DOORBELLS") == 1
    finally:
        r.close()


def test_remap_latency_samples_are_bounded() -> None:
    """A long soak keeps at most MAX_LATENCY_SAMPLES latencies (a uniform reservoir), and the exact maximum."""
    from aperture.qmp_client import remap

    stats = remap.RemapStats("pause")
    for i in range(remap.MAX_LATENCY_SAMPLES + 5000):
        stats.add_latency(1.0 + (i % 7) * 0.1)
    stats.add_latency(99.0)
    assert len(stats.latencies_ms) == remap.MAX_LATENCY_SAMPLES
    assert stats.summary()["latency_ms_max"] == 99.0 and 1.0 <= stats.summary()["latency_ms_p50"] <= 1.6


def _pin(rig: Rig, slot: int, value: int = 1) -> None:
    """What the guest driver does (ABI 1.2): SLOT_PIN[slot] non-zero while a peer may DMA to the slot."""
    rig.dev.ctl._u32[abi.reg("SLOT_PIN") // 4 + slot] = value


def test_a_pinned_slot_is_refused_to_a_host_remap_and_keeps_its_page(rig: Rig) -> None:
    s = SMALL.slot
    rig.dev.retarget({0: 2, 1: 3})
    rig.dev.window_file.view[0:4] = b"peer"  # a peer's DMA landing in the pinned slot
    _pin(rig, 0)
    with pytest.raises(DmaFault) as refused:
        rig.dev.retarget({0: 5})
    assert refused.value.status == STATUS["EBUSY"] and "pinned" in str(refused.value)
    assert rig.dev.retarget({0: 5, 1: 6}, skip_pinned=True) == {1: 6}  # the controller's way: left out
    assert rig.dev.window.slots[:2] == [2, 6] and bytes(rig.dev.window_file.view[0:4]) == b"peer"
    assert rig.dev.pinned_skips == 1 and rig.dev.stats()["pinned"] == [0]
    _pin(rig, 0, 0)
    rig.dev.retarget({0: 5})  # unpinned: the host may move it again, writing the peer's bytes back
    assert bytes(rig.dev.devmem.view[2 * s : 2 * s + 4]) == b"peer"


def test_garbage_pins_only_hold_remaps_back(rig: Rig) -> None:
    """A hostile guest may write anything into SLOT_PIN: any non-zero value pins, nothing else happens."""
    from aperture.qmp_client.remap import random_moves

    for slot in range(SMALL.nr_slots):
        _pin(rig, slot, 0xDEADBEEF)
    assert random_moves(rig.dev, random.Random(1), max_slots=3) == {}
    assert rig.dev.retarget({0: 1, 3: 2}, skip_pinned=True) == {}
    assert rig.one(abi.OP_MAP, slot=0, page=1)[0] == STATUS["OK"]  # the guest's own MAP is its business


def test_random_moves_leave_pinned_slots_alone(tmp_path: Path) -> None:
    from aperture.qmp_client.remap import random_moves

    rig = Rig(tmp_path)
    rng = random.Random(3)
    try:
        rig.dev.retarget({2: 4})
        _pin(rig, 2)
        for _ in range(300):
            moves = random_moves(rig.dev, rng, max_slots=3)
            assert 2 not in moves and 4 not in moves.values()  # its page stays live only there
            rig.dev.retarget(moves)
        assert rig.dev.window.slots[2] == 4
    finally:
        rig.close()
