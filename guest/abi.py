"""The one home of every contract the host and the guest share: the aperture device ABI (control memory,
rings, descriptors, status codes) and the helper's contract (virtio-serial ports, kernel-command-line keys,
message types, check names, the data pattern, the remap stamp, limits, the helper ABI version).

``python -m aperture.guest.abi`` prints the C header the guest helper compiles against
(``guest/helper/aperture_abi.h``); a unit test checks the committed header is exactly this output.
All fields are little-endian. See docs/device-abi.md.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from enum import StrEnum

MAGIC = 0x54525041  # "APRT"
#: Version of the results channel the helper speaks (its `hello` says it); the host refuses another one.
HELPER_ABI = 2  # 2: checks run by a harness (harness details), "written" once per check
ABI_MAJOR = 1
ABI_MINOR = 3  # 1.3: DOORBELL_PEER (ring the device model at peer 1); 1.2: SLOT_PIN; 1.1: DMA_LIST bytes capped
#: The device model's ivshmem peer id (1.3): QEMU's doorbell device runs with master=on so that a VM can be
#: snapshotted, and a master must be peer 0; the guest rings DOORBELL_PEER (Doorbell = peer << 16 | vector).
DOORBELL_PEER_ID = 1

CTL_SIZE = 64 * 1024  # control memory (BAR2 of the ivshmem-doorbell device); a power of two
MAX_SLOTS = 64
RING_ENTRIES = 256  # power of two
DESC_SIZE = 64
COMPL_SIZE = 16
LIST_ENTRY_SIZE = 32
MAX_LIST_ENTRIES = 4096
MAX_DMA_LENGTH = 64 * 1024 * 1024
#: A DMA_LIST moves at most this many bytes in all (ETOOBIG above): one descriptor is bounded work.
MAX_LIST_BYTES = 256 * 1024 * 1024
#: Work the device does per round before it gives stop, remaps, the control socket and the other device a turn:
#: a round ends after ROUND_BYTES copied or ROUND_DESCRIPTORS completed, and the rest waits for the next round.
ROUND_BYTES = 256 * 1024 * 1024
ROUND_DESCRIPTORS = 256
MAX_HIDDEN = 4

#: Aperture devices one VM may have (the helper's device table has this many entries).
MAX_DEVICES = 4

# Register offsets in control memory.
REGS: dict[str, tuple[int, str]] = {
    "MAGIC": (0x000, "u32"),
    "ABI_VERSION": (0x004, "u32"),  # major << 16 | minor
    "DEVICE_INDEX": (0x008, "u32"),
    "STATUS": (0x00C, "u32"),  # STATUS_* bits
    "DEVMEM_SIZE": (0x010, "u64"),
    "WINDOW_SIZE": (0x018, "u64"),
    "SLOT_SIZE": (0x020, "u64"),  # = device page size
    "NR_SLOTS": (0x028, "u32"),
    "RING_ENTRIES": (0x02C, "u32"),
    "NR_HIDDEN": (0x030, "u32"),
    "WINDOW_PCI_SLOT": (0x034, "u32"),  # PCI slot of the window device on bus 0
    "GENERATION": (0x038, "u32"),  # slot-table seqlock: odd while the host updates it
    "ERRORS": (0x03C, "u32"),  # ring protocol errors seen (garbage indices)
    "DOORBELLS": (0x040, "u64"),
    "COMPLETED": (0x048, "u64"),
    "SQ_HEAD": (0x050, "u32"),  # guest: producer index (free running)
    "SQ_TAIL": (0x054, "u32"),  # host: consumer index
    "CQ_HEAD": (0x058, "u32"),  # host: producer index
    "CQ_TAIL": (0x05C, "u32"),  # guest: consumer index
    "DOORBELL_PEER": (0x060, "u32"),  # host: the ivshmem peer id the guest rings (1.3)
    "HIDDEN": (0x080, "u64"),  # NR_HIDDEN pairs of (start, end) device offsets, MAX_HIDDEN at most
    "SLOT_TABLE": (0x100, "u64"),  # NR_SLOTS entries: device page + 1, or 0 when the slot is empty
    "SLOT_PIN": (0x300, "u32"),  # guest: MAX_SLOTS entries, non-zero while a peer may DMA to the slot (1.2)
    "SQ": (0x1000, "desc"),  # RING_ENTRIES descriptors
    "CQ": (0x5000, "compl"),  # RING_ENTRIES completions
}

STATUS_READY = 1 << 0
STATUS_RING_ERROR = 1 << 1  # the guest wrote an impossible SQ_HEAD; the host resynchronised SQ_TAIL

# Opcodes.
OP_NOP = 0
OP_MAP = 1  # slot, page
OP_UNMAP = 2  # slot
OP_DMA = 3  # src, dst, length, flags
OP_DMA_LIST = 4  # src = guest-physical address of `length` list entries (in guest RAM)
OPCODES = {"NOP": OP_NOP, "MAP": OP_MAP, "UNMAP": OP_UNMAP, "DMA": OP_DMA, "DMA_LIST": OP_DMA_LIST}

# DMA flags.
DMA_SRC_LOCAL = 1 << 0  # src is an offset into this device's memory, not guest-physical
DMA_DST_LOCAL = 1 << 1
DMA_FLAGS_MASK = DMA_SRC_LOCAL | DMA_DST_LOCAL

# Completion status codes.
STATUS_CODES = {
    "OK": 0,
    "EINVAL": 1,  # unknown opcode, bad flags, non-zero reserved field, zero length
    "ERANGE": 2,  # slot or page out of range
    "EACCES": 3,  # page is in a non-exposable range
    "EFAULT": 4,  # address is a hole, a register BAR, an unmapped window slot, or unknown
    "ECROSS": 5,  # range crosses a region boundary
    "ETOOBIG": 6,  # length above MAX_DMA_LENGTH, list above MAX_LIST_ENTRIES or MAX_LIST_BYTES
    "EBUSY": 7,  # page already mapped in another slot
    "ENOMAP": 8,  # the host has no address map yet (QMP unavailable)
}
STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}

# Descriptor: opcode u16, flags u16, tag u32, slot u32, reserved0 u32, page u64, src u64, dst u64,
# length u64, reserved1 u64 ×2.
DESC = struct.Struct("<HHIIIQQQQQQ")
# Completion: tag u32, status u16, opcode u16, result u64 (bytes copied, or index of the failing list entry).
COMPL = struct.Struct("<IHHQ")
# DMA list entry: src u64, dst u64, length u64, flags u32, reserved u32.
LIST_ENTRY = struct.Struct("<QQQII")

assert DESC.size == DESC_SIZE and COMPL.size == COMPL_SIZE and LIST_ENTRY.size == LIST_ENTRY_SIZE
# Naturally aligned registers: the host writes each with one store the guest can never see half done.
assert all(off % (8 if kind in ("u64", "desc") else 4 if kind == "u32" else 16) == 0 for off, kind in REGS.values())


@dataclass(frozen=True)
class Descriptor:
    opcode: int
    flags: int
    tag: int
    slot: int
    reserved0: int
    page: int
    src: int
    dst: int
    length: int
    reserved1: int
    reserved2: int

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Descriptor:
        return cls(*DESC.unpack(raw))

    def pack(self) -> bytes:
        return DESC.pack(self.opcode, self.flags, self.tag, self.slot, self.reserved0, self.page, self.src,
                         self.dst, self.length, self.reserved1, self.reserved2)


# ------------------------------------------------------------------ the helper's contract

#: virtio-serial port names: the helper's JSON lines to the host, and the host's commands to `serve`.
RESULTS_PORT = "aperture.results"
COMMAND_PORT = "aperture.cmd"
#: The interactive shell's port: frames of [kind u8][length u16][payload] both ways (SHELL_* below).
SHELL_PORT = "aperture.shell"
SHELL_FRAME = struct.Struct("<BH")
SHELL_OPEN = ord("o")  # host → guest: start a shell (payload: rows u16, cols u16)
SHELL_DATA = ord("d")  # both ways: terminal bytes
SHELL_WINSIZE = ord("w")  # host → guest: rows u16, cols u16
SHELL_HANGUP = ord("k")  # host → guest: the user detached; end the session
SHELL_READY = ord("r")  # guest → host: the session's shell is running
SHELL_EXIT = ord("x")  # guest → host: the shell ended (payload: exit status i32, 128 + N for a signal)


class Env(StrEnum):
    """Kernel-command-line keys; /init exports every ``aperture_*`` parameter into the helper's environment."""

    SCENARIO = "aperture_scenario"  # what the helper runs (SCENARIOS)
    PMEM = "aperture_pmem"  # NVDIMMs the host attached
    PMEM_MODES = "aperture_pmem_modes"  # their modes, comma separated
    FORCE = "aperture_force"  # 1: reconfigure namespaces even if they hold data
    DEVICES = "aperture_devices"  # aperture devices the host attached
    PROBE_BAR = "aperture_probe_bar"  # PCI address of the probe matrix's plain BAR
    STAMP = "aperture_stamp"  # this run's persistence token (hex)
    EXPECT = "aperture_expect"  # the token a reboot must find (persistence checks)
    DURATION = "aperture_duration"  # seconds of remap or fuzz workload
    REMAP = "aperture_remap"  # 1: the host remaps during the fuzz
    REMAP_MODE = "aperture_remap_mode"  # pause | hotplug
    SHARES = "aperture_shares"  # TAG:GUESTDIR:ro|rw,... — host directories /init mounts (9p)
    FAULT = "aperture_fault"  # CHECK:segv | CHECK:hang — the harness's own tests inject a crash or a hang
    ONLY = "aperture_only"  # GLOB,GLOB — run only the checks whose names match one (--only)
    SKIP = "aperture_skip"  # GLOB,GLOB — do not run the checks whose names match one (--skip)


#: Scenarios the helper runs (``aperture_scenario``; ``serve`` takes the ones marked for it).
SCENARIOS = ("probe", "default", "idle", "remap", "bench-device", "bench-dax", "bench-driver", "nvdimm", "dax",
             "aperture", "driver", "fuzz", "hang")


class MsgType(StrEnum):
    """The ``type`` of each JSON line on the results port."""

    HELLO = "hello"  # kernel_release, uptime_s, helper_abi
    PHASE = "phase"  # name: what the helper starts next ("idle": ready for commands)
    CHECK = "check"  # name, ok, detail
    FIGURES = "figures"  # a benchmark's numbers
    LOG = "log"  # a line for the run's notes
    STAMPS = "stamps"  # remap workload: the last stamp written to every page
    WRITTEN = "written"  # patterns the guest wrote to device memory, for the host to verify
    CMD_OUTPUT = "cmd-output"  # id, data: a chunk of an exec's output
    CMD_DONE = "cmd-done"  # id, rc, output_bytes, truncated
    DONE = "done"  # the helper finished; nothing follows
    GARBAGE = "garbage"  # host only: a line that is not a message


class Phase(StrEnum):
    """The ``name`` of a ``phase`` message: what the helper starts next."""

    IDLE = "idle"  # DAX configured; the serve loop takes host commands
    REMAP_START = "remap_start"  # the host may start remapping
    REMAP_END = "remap_end"  # the host stops remapping


class CheckName(StrEnum):
    """Every check name (a JSON contract: outside tools read these). Guest checks are reported by the helper;
    host checks are added by the host."""

    GUEST_MODULES = "guest.modules"
    GUEST_SHARES = "guest.shares"
    GUEST_DMESG = "guest.dmesg"  # host: the guest kernel's own reports (WARNING, BUG, KASAN, lockdep, ...)
    NVDIMM_PRESENT = "nvdimm.present"
    DAX_FSDAX = "dax.fsdax"
    DAX_DEVDAX = "dax.devdax"
    DAX_MAP_SYNC = "dax.map_sync"
    DAX_PERSISTENCE = "dax.persistence"
    ZONE_DEVICE_PROBE = "zone_device.probe"
    ZONE_DEVICE_P2PMEM = "zone_device.p2pmem"
    APERTURE_WINDOW = "aperture.window"
    APERTURE_HIDDEN_REFUSED = "aperture.hidden_refused"
    APERTURE_BAD_DESCRIPTORS = "aperture.bad_descriptors"
    APERTURE_PERSISTENCE = "aperture.persistence"
    APERTURE_FUZZ = "aperture.fuzz"
    P2P_RAM_TO_DEVICE = "p2p.ram_to_device"
    P2P_PMEM_TO_DEVICE = "p2p.pmem_to_device"
    P2P_DEVICE_TO_PMEM = "p2p.device_to_pmem"
    P2P_DEVICE_TO_DEVICE = "p2p.device_to_device"
    P2P_NVME_CMB = "p2p.nvme_cmb"
    REMAP_CONSISTENCY = "remap.consistency"
    WITNESS_HMM_TESTS = "witness.hmm_tests"
    # the guest driver (guest/driver/)
    ZONE_DEVICE_WINDOW = "zone_device.window"
    HMM_MIGRATE = "hmm.migrate"
    HMM_FAULT_BACK = "hmm.fault_back"
    P2P_PEER_MAP = "p2p.peer_map"
    P2P_PEER_MAP_HIDDEN = "p2p.peer_map_hidden"
    P2P_PINNED_VS_REMAP = "p2p.pinned_vs_remap"
    DRIVER_UNLOAD = "driver.unload"
    # host checks
    REMAP_INTEGRITY = "remap.integrity"
    REMAP_HOTPLUG = "remap.hotplug"
    HOST_EMULATOR_THREAD = "host.emulator_thread"


#: The data pattern the helper writes and the host verifies: byte i of seed s is
#: (s * PATTERN_SEED_MUL + (i % PATTERN_PERIOD) * PATTERN_INDEX_MUL) mod 256 (a prime period: no alignment aliases).
PATTERN_SEED_MUL = 7
PATTERN_PERIOD = 251
PATTERN_INDEX_MUL = 13


def pattern(seed: int, length: int) -> bytes:
    period = bytes((seed * PATTERN_SEED_MUL + i * PATTERN_INDEX_MUL) & 0xFF for i in range(PATTERN_PERIOD))
    return (period * (length // PATTERN_PERIOD + 1))[:length]


#: The remap workload's stamp, at the start of a device page: page u64, seq u64 (the page's write count).
REMAP_STAMP = struct.Struct("<QQ")


def reg(name: str) -> int:
    return REGS[name][0]


def c_header() -> str:
    """The C view of this module, generated (never edited by hand)."""
    lines = [
        "/* Generated by `python -m aperture.guest.abi` from guest/abi.py. Do not edit. */",
        "#ifndef APERTURE_ABI_H",
        "#define APERTURE_ABI_H",
        "",
        "#ifdef __KERNEL__",
        "#include <linux/types.h> /* the guest driver (guest/driver/) compiles against this header too */",
        "#else",
        "#include <stdint.h>",
        "#endif",
        "",
        f"#define APERTURE_MAGIC 0x{MAGIC:08x}u",
        f"#define APERTURE_HELPER_ABI {HELPER_ABI}",
        f"#define APERTURE_ABI_MAJOR {ABI_MAJOR}",
        f"#define APERTURE_ABI_MINOR {ABI_MINOR}",
        f"#define APERTURE_CTL_SIZE 0x{CTL_SIZE:x}",
        f"#define APERTURE_MAX_SLOTS {MAX_SLOTS}",
        f"#define APERTURE_RING_ENTRIES {RING_ENTRIES}",
        f"#define APERTURE_MAX_LIST_ENTRIES {MAX_LIST_ENTRIES}",
        f"#define APERTURE_MAX_DMA_LENGTH 0x{MAX_DMA_LENGTH:x}ull",
        f"#define APERTURE_MAX_LIST_BYTES 0x{MAX_LIST_BYTES:x}ull",
        f"#define APERTURE_MAX_HIDDEN {MAX_HIDDEN}",
        f"#define APERTURE_STATUS_READY 0x{STATUS_READY:x}u",
        f"#define APERTURE_STATUS_RING_ERROR 0x{STATUS_RING_ERROR:x}u",
        f"#define APERTURE_MAX_DEVICES {MAX_DEVICES}",
        f"#define APERTURE_DOORBELL_PEER_ID {DOORBELL_PEER_ID}",
        "",
        f'#define APERTURE_RESULTS_PORT "{RESULTS_PORT}"',
        f'#define APERTURE_COMMAND_PORT "{COMMAND_PORT}"',
        f'#define APERTURE_SHELL_PORT "{SHELL_PORT}"',
    ]
    lines += [f"#define APERTURE_SHELL_{name} '{chr(value)}'" for name, value in (
        ("OPEN", SHELL_OPEN), ("DATA", SHELL_DATA), ("WINSIZE", SHELL_WINSIZE), ("HANGUP", SHELL_HANGUP),
        ("READY", SHELL_READY), ("EXIT", SHELL_EXIT))]
    lines += [f'#define APERTURE_ENV_{e.name} "{e.value}"' for e in Env]
    lines += [f'#define APERTURE_MSG_{m.name} "{m.value}"' for m in MsgType]
    lines += [f'#define APERTURE_PHASE_{ph.name} "{ph.value}"' for ph in Phase]
    lines += [f'#define APERTURE_CHECK_{c.name} "{c.value}"' for c in CheckName]
    lines += [
        f"#define APERTURE_PATTERN_SEED_MUL {PATTERN_SEED_MUL}u",
        f"#define APERTURE_PATTERN_PERIOD {PATTERN_PERIOD}u",
        f"#define APERTURE_PATTERN_INDEX_MUL {PATTERN_INDEX_MUL}u",
        "",
    ]
    for name, (off, _) in REGS.items():
        lines.append(f"#define APERTURE_REG_{name} 0x{off:04x}")
    lines.append("")
    for name, val in OPCODES.items():
        lines.append(f"#define APERTURE_OP_{name} {val}")
    lines += [f"#define APERTURE_DMA_SRC_LOCAL 0x{DMA_SRC_LOCAL:x}",
              f"#define APERTURE_DMA_DST_LOCAL 0x{DMA_DST_LOCAL:x}", ""]
    for name, val in STATUS_CODES.items():
        lines.append(f"#define APERTURE_ST_{name} {val}")
    lines += [
        "",
        "struct aperture_desc {",
        "    uint16_t opcode;",
        "    uint16_t flags;",
        "    uint32_t tag;",
        "    uint32_t slot;",
        "    uint32_t reserved0;",
        "    uint64_t page;",
        "    uint64_t src;",
        "    uint64_t dst;",
        "    uint64_t length;",
        "    uint64_t reserved1[2];",
        "};",
        "",
        "struct aperture_compl {",
        "    uint32_t tag;",
        "    uint16_t status;",
        "    uint16_t opcode;",
        "    uint64_t result;",
        "};",
        "",
        "struct aperture_list_entry {",
        "    uint64_t src;",
        "    uint64_t dst;",
        "    uint64_t length;",
        "    uint32_t flags;",
        "    uint32_t reserved;",
        "};",
        "",
        f"_Static_assert(sizeof(struct aperture_desc) == {DESC_SIZE}, \"descriptor size\");",
        f"_Static_assert(sizeof(struct aperture_compl) == {COMPL_SIZE}, \"completion size\");",
        f"_Static_assert(sizeof(struct aperture_list_entry) == {LIST_ENTRY_SIZE}, \"list entry size\");",
        "",
        "struct aperture_remap_stamp {",
        "    uint64_t page;",
        "    uint64_t seq;",
        "};",
        "",
        f"_Static_assert(sizeof(struct aperture_remap_stamp) == {REMAP_STAMP.size}, \"remap stamp size\");",
        "",
        "static inline uint8_t aperture_pattern_byte(uint32_t seed, uint64_t i)",
        "{",
        "    return (uint8_t)(seed * APERTURE_PATTERN_SEED_MUL + (uint32_t)(i % APERTURE_PATTERN_PERIOD) *",
        "                     APERTURE_PATTERN_INDEX_MUL);",
        "}",
        "",
        "static inline const char *aperture_status_name(unsigned s)",
        "{",
        "    switch (s) {",
    ]
    for name, val in STATUS_CODES.items():
        lines.append(f"    case {val}: return \"{name}\";")
    lines += ["    default: return \"UNKNOWN\";", "    }", "}", "", "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(c_header())
