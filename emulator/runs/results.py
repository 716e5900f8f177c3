"""Run results: checks from the guest, host-side verification, and the JSON contract of ``aperture run``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from aperture.emulator.config import ram_ranges
from aperture.emulator.runs import summaries
from aperture.guest import abi
from aperture.guest.abi import CheckName
from aperture.qmp_client.qemu import pmem_index, win_id
from aperture.qmp_client.session import MemoryDevice, PciDevice

#: What a check's name looks like (docs/run-schema.json): anything else on the results channel is not a check.
CHECK_NAME = re.compile(r"[a-z_0-9]{1,32}\.[a-z_0-9]{1,48}")


#: A check's status: ``skip`` is a check that could not apply here (its detail says why in ``skip_reason``);
#: ``ok`` stays true for it, as a skip is not a failure, but it is not a pass either.
CheckStatus = Literal["pass", "fail", "skip"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: Any = None
    status: CheckStatus = field(init=False)

    def __post_init__(self) -> None:
        skipped = isinstance(self.detail, dict) and bool(self.detail.get("skip_reason"))
        self.status = "fail" if not self.ok else "skip" if skipped else "pass"

    @property
    def skip_reason(self) -> str:
        return str(self.detail.get("skip_reason")) if self.status == "skip" and isinstance(self.detail, dict) else ""

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Check | None:
        """A ``check`` message from the guest as a Check, or None when it is malformed (its name is not
        ``group.name`` in lower case, or its ok is not a boolean): then it is not a check."""
        name, ok = msg.get("name"), msg.get("ok")
        if not (isinstance(name, str) and CHECK_NAME.fullmatch(name) and isinstance(ok, bool)):
            return None
        entry = CHECKS.get(name)
        if entry is not None and entry.runs_in == "host":
            return None  # the host's own checks (guest.dmesg, host.*) cannot be reported by the guest
        return cls(name, ok, msg.get("detail"))


@dataclass
class RunResult:
    ok: bool
    accel: str
    accel_reason: str
    qemu_version: str
    kernel_release: str
    boot_s: float | None
    poweroff_s: float | None
    run_dir: str
    checks: list[Check] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    boots: int = 1
    run_name: str = ""
    devices: list[dict[str, Any]] = field(default_factory=list)
    start: str = "cold"  # "restore": from a warm-start snapshot (emulator/snapshots.py)
    restore_s: float | None = None  # QEMU start → state loaded and running
    snapshot: str | None = None  # the snapshot's key
    snapshot_made_s: float | None = None  # this run made the snapshot first

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def emulator_thread_check(count: int, first: list[str], run_dir: Path) -> Check:
    """``host.emulator_thread``: the device-emulator thread raised. Never ok: a guest that crashes our device
    thread must not look like a passing run."""
    return Check(CheckName.HOST_EMULATOR_THREAD, False,
                 {"errors": count, "first": first, "log": str(run_dir / "emulator.log")})


def verify_nvdimm(check: Check, devices: list[MemoryDevice]) -> Check:
    """Host side of ``nvdimm.present``: the guest's regions must be exactly QMP's NVDIMMs."""
    expected = sorted((d.addr, d.size) for d in devices if d.kind == "nvdimm")
    detail = check.detail if isinstance(check.detail, dict) else {}
    raw = detail.get("regions")
    regions: list[Any] = raw if isinstance(raw, list) else []
    seen = sorted((int(r.get("addr", -1)), int(r.get("size", -1))) for r in regions if isinstance(r, dict))
    matches = seen == expected
    detail = dict(detail, qmp=[{"addr": a, "size": s} for a, s in expected], matches_qmp=matches)
    return Check(check.name, bool(check.ok and matches and expected), detail)


#: witness.hmm_tests is ok with 0 failed and at least this many passed.
HMM_TESTS_MIN_PASSED = 20

#: Why hmm-tests skips what it skips in the default VM (matched against its SKIP messages).
HMM_SKIP_REASONS: tuple[tuple[str, str], ...] = (
    ("DEVICE_COHERENT", "test_hmm is loaded without spm_addr_dev0/1: device-coherent memory needs 2 x 256 MiB "
     "of guest physical memory set aside as special-purpose memory, more than the default 512 MiB VM can spare"),
    ("Huge page", "no hugetlbfs page could be had (nr_hugepages is set to 4 before the run)"),
    ("gup_test", "no /sys/kernel/debug/gup_test (kernel without CONFIG_GUP_TEST or debugfs not mounted)"),
)


#: The guest driver's checks (guest/driver/, checks_driver.c); those whose peer is the NVMe controller; those
#: that report device bytes for the host to find in the device-memory file.
DRIVER_CHECKS = frozenset({CheckName.ZONE_DEVICE_WINDOW, CheckName.HMM_MIGRATE, CheckName.HMM_FAULT_BACK,
                           CheckName.P2P_PEER_MAP, CheckName.P2P_PEER_MAP_HIDDEN, CheckName.P2P_PINNED_VS_REMAP,
                           CheckName.DRIVER_UNLOAD})
NVME_DRIVER_CHECKS = frozenset({CheckName.ZONE_DEVICE_WINDOW, CheckName.P2P_PEER_MAP,
                                CheckName.P2P_PINNED_VS_REMAP})
BYTES_DRIVER_CHECKS = frozenset({CheckName.ZONE_DEVICE_WINDOW, CheckName.HMM_MIGRATE, CheckName.P2P_PEER_MAP,
                                 CheckName.P2P_PINNED_VS_REMAP})
MAX_DEVICE_REGIONS = 40


def _helper_claim(w: dict[str, Any]) -> bool:
    """A ``written`` record of the helper's own checks (not a driver check's, not memory released to it)."""
    return "check" not in w and w.get("released") is not True


def driver_claims(check: Check) -> list[dict[str, Any]]:
    """A driver check's ``device_bytes`` as claims on device memory, tagged with the check's name (the run keeps
    them in order with the helper's ``written`` records: a later write supersedes an earlier one)."""
    detail = check.detail if isinstance(check.detail, dict) else {}
    regions = detail.get("device_bytes") if check.name in BYTES_DRIVER_CHECKS else None
    if not isinstance(regions, list):
        return []
    return [dict(r, check=check.name) for r in regions[:MAX_DEVICE_REGIONS] if isinstance(r, dict)]


def host_memcpy_mb_s(length: int) -> float | None:
    """The host's memcpy over ``length`` bytes (best of 3), the baseline a guest copy figure is compared to."""
    if not 0 < length <= 256 << 20:
        return None
    src, dst = bytearray(os.urandom(1 << 20)) * (length >> 20 or 1), bytearray(length or 1)
    best = min(_timed_copy(dst, src) for _ in range(3))
    return round(len(src) / 1e6 / best, 1) if best > 0 else None


def _timed_copy(dst: bytearray, src: bytearray) -> float:
    t0 = time.perf_counter()
    memoryview(dst)[: len(src)] = src
    return time.perf_counter() - t0


def pinned_vs_remap(check: Check, stats: Any) -> Check:
    """``p2p.pinned_vs_remap``: the host did remap during the peer DMA (around the pinned slots), without error."""
    summary: dict[str, Any] | None = stats.summary() if stats is not None else None
    detail = check.detail if isinstance(check.detail, dict) else {"guest": check.detail}
    if detail.get("result") == "absent":
        return check
    remapped = summary is not None and summary["remaps"] > 0 and not summary["errors"]
    return Check(check.name, check.ok and remapped, dict(detail, host_remaps=summary))


def explain_hmm_skip(reason: str) -> str:
    return next((why for key, why in HMM_SKIP_REASONS if key.lower() in reason.lower()),
                "not explained by aperture: see the reason hmm-tests gives")


def _guest_int(value: Any) -> int:
    """An integer the guest reported, or -1 when what it sent is not one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


@dataclass
class HostVerifier:
    """Checks the guest's claims against what the host knows: QMP's address map, backing files, kernel config."""

    devices: list[MemoryDevice]
    pci: list[PciDevice]
    pmem_files: list[Path]
    pmem_modes: list[str]
    kconfig: dict[str, str]
    memory: int
    probe_bar_id: str
    devmem_files: list[Path] = field(default_factory=list)
    nvme_file: Path | None = None
    nvme_id: str = ""
    hmm_tests_in_image: bool = False
    driver_in_image: bool = False

    def nvdimm_at(self, phys: int, length: int = 1) -> tuple[int, MemoryDevice] | None:
        """Index and device of the NVDIMM holding [phys, phys+length), in configuration order."""
        nvdimms = [d for d in self.devices if d.kind == "nvdimm"]
        for d in nvdimms:
            if d.addr <= phys and phys + length <= d.addr + d.size:
                return pmem_index(d.memdev), d
        return None

    def read_pmem(self, phys: int, length: int) -> bytes | None:
        hit = self.nvdimm_at(phys, length)
        if hit is None or not 0 <= hit[0] < len(self.pmem_files):
            return None
        with open(self.pmem_files[hit[0]], "rb") as f:
            f.seek(phys - hit[1].addr)
            return f.read(length)

    def verify(self, check: Check, written: list[dict[str, Any]] | None = None) -> Check:
        """A check as the host sees it: its entry in CHECKS says when it cannot apply here (a skip) and how the
        host verifies it."""
        if isinstance(check.detail, dict) and "harness" in check.detail:
            return check  # the guest's harness failed it (crash, timeout): the check never got to report
        entry = CHECKS.get(check.name)
        if entry is None:
            return check
        if entry.skips is not None:
            skipped = self._absent_as_expected(check, *entry.skips(self, check.name))
            if skipped is not None:
                return skipped
        return entry.verify(self, check, written or []) if entry.verify is not None else check

    def _on(self, option: str) -> bool:
        return self.kconfig.get(option, "n") in ("y", "m")

    def _absent_as_expected(self, check: Check, expected_absent: bool, why: str) -> Check | None:
        """A row the guest reports absent is ok exactly when the kernel (or topology) cannot have it."""
        detail = check.detail if isinstance(check.detail, dict) else {}
        absent = detail.get("result") == "absent"
        if expected_absent:
            return Check(check.name, absent, dict(detail, expected="absent", skip_reason=why))
        if absent:
            return Check(check.name, False, dict(detail, expected="present"))
        return None

    def nvme_bar_of(self, phys: int) -> int | None:
        """Which BAR of the NVMe controller (QMP ``query-pci``) holds ``phys``, if any."""
        for dev in self.pci:
            if dev.qdev_id == self.nvme_id:
                for index, (addr, size) in dev.bars.items():
                    if addr <= phys < addr + size:
                        return index
        return None

    def _p2pmem_expected_absent(self, name: str = "") -> tuple[bool, str]:
        if self.nvme_file is None:
            return True, "no NVMe controller in this VM (--nvme none)"
        if not self._on("CONFIG_PCI_P2PDMA"):
            return True, "kernel without CONFIG_PCI_P2PDMA: the NVMe CMB is not published as p2pmem"
        if not self._on("CONFIG_BLK_DEV_NVME"):
            return True, "kernel without CONFIG_BLK_DEV_NVME"
        return False, ""

    def _verify_p2pmem_row(self, check: Check) -> Check:
        """``zone_device.p2pmem``: O_DIRECT into p2pmem worked, at an address inside the NVMe's CMB BAR."""
        detail = check.detail if isinstance(check.detail, dict) else {}
        phys = _guest_int(detail.get("phys"))
        bar = self.nvme_bar_of(phys) if phys > 0 else None
        return Check(check.name, check.ok and detail.get("result") == "ok" and bar is not None,
                     dict(detail, expected="ok", qmp_nvme_bar=bar, phys_ok=bar is not None))

    def _verify_nvme_cmb(self, check: Check) -> Check:
        """``p2p.nvme_cmb``: the namespace's backing file holds the pattern the guest moved out of the CMB."""
        detail = check.detail if isinstance(check.detail, dict) else {}
        off, length, seed = (_guest_int(detail.get(k)) for k in ("offset", "len", "seed"))
        src_bar = self.nvme_bar_of(_guest_int(detail.get("src_phys")))
        host_ok = False
        if self.nvme_file is not None and off >= 0 and 0 < length <= 16 << 20 and seed >= 0:
            with open(self.nvme_file, "rb") as f:
                f.seek(off)
                host_ok = f.read(length) == abi.pattern(seed, length)
        return Check(check.name, check.ok and host_ok and src_bar is not None,
                     dict(detail, host_verified=host_ok, host_file=str(self.nvme_file), host_offset=off,
                          src_in_nvme_bar=src_bar))

    def _hmm_tests_expected_absent(self, name: str = "") -> tuple[bool, str]:
        if not self.hmm_tests_in_image:
            return True, ("no hmm-tests for this kernel (built only from a kernel tree: `aperture kernel build`'s, "
                          "or --kernel DIR)")
        if not self._on("CONFIG_TEST_HMM"):
            return True, "kernel without CONFIG_TEST_HMM"
        return False, ""

    def _verify_hmm_tests(self, check: Check) -> Check:
        """``witness.hmm_tests``: 0 failed and at least 20 passed; every skipped group explained."""
        detail = check.detail if isinstance(check.detail, dict) else {}
        groups = [g for g in detail.get("skipped_groups", []) if isinstance(g, dict)]
        explained = [dict(g, why=explain_hmm_skip(str(g.get("reason", "")))) for g in groups]
        passed, failed = _guest_int(detail.get("passed")), _guest_int(detail.get("failed"))
        ok = check.ok and failed == 0 and passed >= HMM_TESTS_MIN_PASSED and not detail.get("timed_out")
        return Check(check.name, ok, dict(detail, skipped_groups=explained, min_passed=HMM_TESTS_MIN_PASSED))

    def _driver_expected_absent(self, name: str) -> tuple[bool, str]:
        if not self.driver_in_image:
            return True, ("no aperture driver in the guest image: it is built only against a kernel build tree "
                          "(the kernel `aperture kernel build` makes, or --kernel DIR)")
        if not self.devmem_files:
            return True, "no aperture devices in this VM"
        if name in NVME_DRIVER_CHECKS and self.nvme_file is None:
            return True, "no NVMe controller in this VM (--nvme none): it is the peer"
        return False, ""

    def window_bar(self, device: int) -> tuple[int, int] | None:
        """(address, size) of device ``device``'s window BAR, from QMP."""
        for dev in self.pci:
            if dev.qdev_id == win_id(device) and 2 in dev.bars:
                return dev.bars[2]
        return None

    def _verify_driver(self, check: Check, claims: list[dict[str, Any]]) -> Check:
        """The guest driver's checks: absent exactly when there is no driver (or no peer); otherwise the device
        bytes they report are in the device-memory file, and a window address is inside the window BAR."""
        detail = check.detail if isinstance(check.detail, dict) else {"guest": check.detail}
        extra: dict[str, Any] = {}
        ok = check.ok
        if check.name in BYTES_DRIVER_CHECKS:
            if not any(c.get("check") == check.name for c in claims):
                claims = claims + driver_claims(check)
            verified, superseded, mismatches = self.verify_claims(claims, lambda c: c.get("check") == check.name)
            extra.update(host_verified_regions=verified, host_superseded=superseded,
                         host_mismatches=mismatches[:10], host_dir=str(self.devmem_files[0].parent))
            ok = ok and verified > 0 and not mismatches
        if check.name == CheckName.ZONE_DEVICE_WINDOW:
            bar = self.window_bar(_guest_int(detail.get("device")))
            bus = _guest_int(detail.get("bus_addr"))
            inside = bar is not None and bar[0] <= bus < bar[0] + bar[1]
            extra.update(qmp_window_bar=[bar[0], bar[1]] if bar else None, bus_addr_in_window_bar=inside)
            ok = ok and inside
        if check.name == CheckName.HMM_MIGRATE:
            mb_s = host_memcpy_mb_s(_guest_int(detail.get("bytes")))
            guest = detail.get("mb_s")
            extra.update(host_memcpy_mb_s=mb_s, migrate_vs_host_memcpy=round(float(guest) / mb_s, 4)
                         if isinstance(guest, (int, float)) and mb_s else None)
        return Check(check.name, ok, dict(detail, **extra))

    def _verify_written(self, check: Check, written: list[dict[str, Any]]) -> Check:
        """Device memory after the run holds every pattern the guest says it wrote (window, DMA, P2P)."""
        verified, superseded, mismatches = self.verify_claims(written, _helper_claim)
        detail = check.detail if isinstance(check.detail, dict) else {"guest": check.detail}
        ok = any(_helper_claim(w) for w in written) and not mismatches
        return Check(check.name, check.ok and ok,
                     dict(detail, host_verified_regions=verified, host_superseded=superseded,
                          host_mismatches=mismatches))

    def verify_claims(self, claims: list[dict[str, Any]],
                      own: Callable[[dict[str, Any]], bool]) -> tuple[int, int, list[dict[str, Any]]]:
        """Check the claims ``own`` selects against the device-memory files: ``{device, offset, len, seed,
        start?}`` says bytes [start, start + len) of seed's pattern are at ``offset``. ``claims`` are every claim
        of the run in the order the guest made them (the helper's ``written`` records and the driver checks'
        device bytes): one a later claim overlaps is superseded, not compared. Returns (verified, superseded,
        mismatches)."""
        mismatches: list[dict[str, Any]] = []
        verified = superseded = 0
        covered: list[tuple[int, int, int]] = []  # (device, start, end) of newer claims
        for w in reversed(claims):
            dev, off, length, seed = (_guest_int(w.get(k)) for k in ("device", "offset", "len", "seed"))
            start = _guest_int(w.get("start", 0))
            if w.get("released") is True:  # handed to the guest driver: may be overwritten, nothing to compare
                if 0 <= dev < len(self.devmem_files) and off >= 0 and 0 < length <= 64 << 30:
                    covered.append((dev, off, off + length))
                continue
            mine = own(w)
            if not 0 <= dev < len(self.devmem_files) or off < 0 or not 0 < length <= 64 << 20 or seed < 0 \
                    or not 0 <= start <= 64 << 20:
                if mine:
                    mismatches.append({"record": w, "why": "malformed record"})
                continue
            newer = any(d == dev and off < e and s < off + length for d, s, e in covered)
            covered.append((dev, off, off + length))
            if not mine:
                continue
            if newer:
                superseded += 1  # a later write overlaps it: only the later one is still in memory
                continue
            with open(self.devmem_files[dev], "rb") as f:
                f.seek(off)
                got = f.read(length)
            if got != abi.pattern(seed, start + length)[start:]:
                mismatches.append({"device": dev, "offset": off, "len": length, "seed": seed, "start": start})
            else:
                verified += 1
        return verified, superseded, mismatches

    def verify_stamps(self, stamps: list[Any], devices: Any) -> Check:
        """``remap.integrity``: each page's header in device memory is the last stamp the guest wrote to it."""
        bad = []
        checked = 0
        for item in stamps:
            if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, int) for v in item)):
                bad.append({"record": item, "why": "malformed"})
                continue
            dev, page, seq = item
            if not 0 <= dev < len(self.devmem_files) or not 0 <= page < devices[dev].nr_pages:
                bad.append({"record": item, "why": "out of range"})
                continue
            with open(self.devmem_files[dev], "rb") as f:
                f.seek(page * devices[dev].slot)
                got_page, got_seq = abi.REMAP_STAMP.unpack(f.read(abi.REMAP_STAMP.size))
            checked += 1
            if (got_page, got_seq) != (page, seq):
                bad.append({"device": dev, "page": page, "want_seq": seq, "found": [got_page, got_seq]})
        return Check(CheckName.REMAP_INTEGRITY, checked > 0 and not bad,
                     {"pages_checked": checked, "mismatches": bad[:20], "mismatch_count": len(bad)})

    def _ndctl_witness(self, detail: dict[str, Any], want_mode: str) -> dict[str, Any]:
        """What ``ndctl list -N`` (run in the guest after configuration) says about the checked device."""
        raw = detail.get("ndctl")
        if not isinstance(raw, str):
            return {"present": False, "why": "no ndctl in the guest image (scripts/setup.sh installs it on the host)"}
        device = str(detail.get("device", "")).removeprefix("/dev/")
        witness: dict[str, Any] = {"present": True, "device": device, "expected_mode": want_mode}
        try:
            listed = json.loads(raw)
        except ValueError:
            return dict(witness, ok=False, why=f"ndctl output is not JSON: {raw[:120]!r}")
        namespaces = listed if isinstance(listed, list) else [listed]  # ndctl prints a lone object unwrapped
        for ns in namespaces:
            if isinstance(ns, dict) and device and device in (ns.get("blockdev"), ns.get("chardev")):
                mode = ns.get("mode")
                return dict(witness, ok=mode == want_mode, namespace=ns.get("dev"), mode=mode,
                            **({} if mode == want_mode else {"why": f"ndctl says {device} is in mode {mode}"}))
        return dict(witness, ok=False, why=f"ndctl lists no namespace with device {device or '?'}")

    def _verify_stamp(self, check: Check) -> Check:
        """The guest's stamp must be in the NVDIMM's backing file at the physical address it reports."""
        detail = check.detail if isinstance(check.detail, dict) else {}
        phys, length = _guest_int(detail.get("stamp_phys")), _guest_int(detail.get("stamp_len"))
        unit = detail.get("stamp")
        if phys <= 0 or not 0 < length <= 1 << 20 or not isinstance(unit, str) or not unit:
            return Check(check.name, False, dict(detail, host_verified=False, host_error="no stamp reported"))
        want_mode = "fsdax" if check.name == CheckName.DAX_FSDAX else "devdax"
        hit = self.nvdimm_at(phys, length)
        got = self.read_pmem(phys, length)
        expected = (unit.encode() * (length // len(unit) + 1))[:length]
        in_right_dimm = hit is not None and 0 <= hit[0] < len(self.pmem_modes) and self.pmem_modes[hit[0]] == want_mode
        ok = got == expected and in_right_dimm
        extra: dict[str, Any] = {"host_verified": ok}
        if hit is not None:
            extra.update(host_file=str(self.pmem_files[hit[0]]) if hit[0] < len(self.pmem_files) else None,
                         host_offset=phys - hit[1].addr)
        if not ok:
            extra["host_error"] = ("stamp not at that address in the backing file" if in_right_dimm
                                   else "address is not inside the expected NVDIMM")
        witness = self._ndctl_witness(detail, want_mode)
        detail = {k: v for k, v in detail.items() if k != "ndctl"}  # the parsed witness replaces the raw listing
        return Check(check.name, check.ok and ok and witness.get("ok", True), dict(detail, ndctl_witness=witness,
                                                                                   **extra))

    def expected_probe(self) -> dict[str, str]:
        """What each probe row should give on this kernel: a struct page makes O_DIRECT work."""
        k = self.kconfig
        known = bool(k)

        def on(flag: str, default: bool = True) -> bool:
            return k.get(flag, "n") in ("y", "m") if known else default

        return {
            "ram": "ok",
            "devdax": ("ok" if on("CONFIG_ZONE_DEVICE") and on("CONFIG_DEV_DAX") else "EFAULT")
            if "devdax" in self.pmem_modes else "absent",
            "fsdax": ("ok" if on("CONFIG_ZONE_DEVICE") and on("CONFIG_FS_DAX") else "EFAULT")
            if "fsdax" in self.pmem_modes else "absent",
            "bar": "EFAULT",
            "p2pmem": "absent" if self._p2pmem_expected_absent()[0] else "ok",
        }

    def _verify_probe(self, check: Check) -> Check:
        detail = check.detail if isinstance(check.detail, dict) else {}
        rows = [r for r in detail.get("rows", []) if isinstance(r, dict)]
        expected = self.expected_probe()
        bar2 = next((d.bars.get(2) for d in self.pci if d.qdev_id == self.probe_bar_id), None)
        all_ok = bool(rows) and {r.get("memory") for r in rows} >= set(expected)
        out_rows = []
        for row in rows:
            mem = str(row.get("memory"))
            want = expected.get(mem, "?")
            phys = _guest_int(row.get("phys"))
            phys_ok: bool | None = None
            if row.get("result") not in ("absent", None):
                if mem == "ram":
                    phys_ok = phys > 0 and any(a <= phys < a + n for a, _, n in ram_ranges(self.memory))
                elif mem in ("devdax", "fsdax"):
                    hit = self.nvdimm_at(phys)
                    phys_ok = hit is not None and hit[0] < len(self.pmem_modes) and self.pmem_modes[hit[0]] == mem
                elif mem == "bar":
                    phys_ok = bar2 is not None and phys == bar2[0]
                elif mem == "p2pmem":
                    phys_ok = phys > 0 and self.nvme_bar_of(phys) is not None
            matches = row.get("result") == want and phys_ok is not False
            all_ok = all_ok and matches
            out_rows.append(dict(row, expected=want, phys_ok=phys_ok, matches=matches))
        return Check(check.name, check.ok and all_ok,
                     dict(detail, rows=out_rows, qmp_bar2=list(bar2) if bar2 else None,
                          kernel_config_known=bool(self.kconfig)))


@dataclass
class UntouchableFiles:
    """Checksums of files no guest action may change (the fuzzer's witness): the image, the kernel, a canary
    the host puts in the run dir. Whatever the device model does, these stay byte-for-byte the same."""

    digests: dict[Path, str]

    @classmethod
    def take(cls, run_dir: Path, files: list[Path]) -> UntouchableFiles:
        run_dir.mkdir(parents=True, exist_ok=True)
        canary = run_dir / "canary.bin"
        canary.write_bytes(os.urandom(1 << 20))
        return cls({p: _sha256(p) for p in [*files, canary]})

    def changed(self) -> list[str]:
        return [str(p) for p, digest in self.digests.items() if _sha256(p) != digest]


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def verify_fuzz(check: Check, files: UntouchableFiles | None, remap_stats: Any) -> Check:
    """``aperture.fuzz``: the devices survived (guest) and nothing outside the device's reach changed (host)."""
    detail = dict(check.detail) if isinstance(check.detail, dict) else {"guest": check.detail}
    changed = files.changed() if files is not None else ["no checksums taken"]
    detail.update(host_files_checked=len(files.digests) if files else 0, host_files_changed=changed)
    if remap_stats is not None:
        detail.update({k: v for k, v in remap_stats.summary().items() if k in ("remaps", "errors")})
    ok = check.ok and not changed and not (remap_stats is not None and remap_stats.summary().get("errors"))
    return Check(check.name, bool(ok), detail)


def remap_consistency(check: Check, stats: Any) -> Check:
    """The guest saw no violation, and the host really remapped (a run with no remap proves nothing)."""
    detail = dict(check.detail) if isinstance(check.detail, dict) else {"guest": check.detail}
    summary = stats.summary() if stats is not None else {"remaps": 0}
    detail.update(summary)
    ok = check.ok and summary.get("remaps", 0) > 0 and not summary.get("errors")
    return Check(check.name, bool(ok), detail)


def remap_hotplug(consistency: Check | None, stats: Any) -> Check:
    """``remap.hotplug``: windows were re-plugged, and the guest found every new window and carried on."""
    summary = stats.summary() if stats is not None else {"remaps": 0}
    guest = consistency.detail if consistency is not None and isinstance(consistency.detail, dict) else {}
    detail = {k: summary.get(k) for k in ("remaps", "latency_ms_p50", "latency_ms_max", "device_deleted_ms_p50",
                                          "errors")}
    detail.update({k: guest.get(k) for k in ("guest_reprobes", "guest_reprobe_failures", "guest_reprobe_ms_avg",
                                             "guest_reprobe_ms_max", "violations")})
    ok = (summary.get("remaps", 0) > 0 and not summary.get("errors") and (guest.get("guest_reprobes") or 0) > 0
          and not guest.get("guest_reprobe_failures") and guest.get("violations") == 0)
    return Check(CheckName.REMAP_HOTPLUG, bool(ok), detail)


def junit_xml(result: RunResult) -> str:
    """The run as JUnit XML (one testcase per check) for CI systems that are not pytest."""
    import json as _json
    import xml.etree.ElementTree as ET

    failures = sum(c.status == "fail" for c in result.checks)
    skipped = sum(c.status == "skip" for c in result.checks)
    suite = ET.Element("testsuite", name="aperture", tests=str(len(result.checks)), failures=str(failures),
                       errors="0", skipped=str(skipped), time=str(result.poweroff_s or 0))
    props = ET.SubElement(suite, "properties")
    for key in ("accel", "qemu_version", "kernel_release", "boot_s", "run_dir"):
        ET.SubElement(props, "property", name=key, value=str(getattr(result, key)))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"aperture.{c.name.split('.')[0]}", name=c.name)
        detail = _json.dumps(c.detail, indent=1, default=str)
        if not c.ok:
            ET.SubElement(case, "failure", message=f"{c.name} failed").text = detail
        elif c.status == "skip":
            ET.SubElement(case, "skipped", message=c.skip_reason)
        else:
            ET.SubElement(case, "system-out").text = detail
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def ktap(checks: list[Check]) -> str:
    """The run as KTAP version 1, as the kernel's selftests print it (``ok N name``, ``not ok N name``,
    ``ok N name # SKIP reason``, diagnostics as ``#`` lines) for KernelCI, LKFT and ``kunit.py parse``."""
    import json as _json

    lines = ["KTAP version 1", f"1..{len(checks)}"]
    for n, c in enumerate(checks, 1):
        lines.append(f"# {c.name}: {_json.dumps(c.detail, default=str)[:400]}")
        if c.status == "skip":
            reason = " ".join(c.skip_reason.split()) or "does not apply"
            lines.append(f"ok {n} {c.name} # SKIP {reason}")
        else:
            lines.append(f"{'ok' if c.ok else 'not ok'} {n} {c.name}")
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")}
    lines.append(f"# Totals: pass:{counts['pass']} fail:{counts['fail']} xfail:0 xpass:0 "
                 f"skip:{counts['skip']} error:0")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the check table
SkipRule = Callable[[HostVerifier, str], tuple[bool, str]]
Verify = Callable[[HostVerifier, Check, list[dict[str, Any]]], Check]
Summary = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class CheckEntry:
    """What the host knows about one check: where it runs, when it cannot apply here (a skip, with the reason),
    how the host verifies it after the VM is gone, and its one human line. A check with no entry is reported as
    the guest said."""

    runs_in: str  # the helper scenario (guest/helper/scenarios.c) that reports it, or "host"
    summary: Summary | None = None
    verify: Verify | None = None
    skips: SkipRule | None = None
    #: The detail's "error", when it has one, is the whole summary (device and driver checks)
    error_is_summary: bool = False
    #: The kernel options (without CONFIG_) it needs to run rather than skip: `aperture kernel check` reads them
    needs: tuple[str, ...] = ()


def _written(v: HostVerifier, c: Check, written: list[dict[str, Any]]) -> Check:
    return v._verify_written(c, written)


def _driver(v: HostVerifier, c: Check, written: list[dict[str, Any]]) -> Check:
    return v._verify_driver(c, written)


def _only(method: Callable[[HostVerifier, Check], Check]) -> Verify:
    """A verifier that needs only the check (not the run's written records)."""
    return lambda v, c, _written: method(v, c)


#: What each family of checks needs from the kernel (options a tree must have; see `aperture kernel check`).
NVDIMM_NEEDS = ("LIBNVDIMM", "ACPI_NFIT", "BLK_DEV_PMEM")
FSDAX_NEEDS = NVDIMM_NEEDS + ("ZONE_DEVICE", "NVDIMM_PFN", "FS_DAX", "EXT4_FS")
DEVDAX_NEEDS = NVDIMM_NEEDS + ("ZONE_DEVICE", "NVDIMM_DAX", "DEV_DAX", "DEV_DAX_PMEM")
P2P_NEEDS = ("PCI_P2PDMA", "BLK_DEV_NVME")
DRIVER_NEEDS = ("MODULES", "ZONE_DEVICE", "DEVICE_PRIVATE", "MIGRATION", "HMM_MIRROR", "PCI_P2PDMA", "MMU_NOTIFIER")


def _device(summary: Summary) -> CheckEntry:
    return CheckEntry("default", summary, error_is_summary=True, needs=DEVDAX_NEEDS)


def _driver_check(summary: Summary, nvme: bool = False) -> CheckEntry:
    return CheckEntry("default", summary, _driver, HostVerifier._driver_expected_absent, error_is_summary=True,
                      needs=DRIVER_NEEDS + (("BLK_DEV_NVME",) if nvme else ()))


_p2pmem_absent: SkipRule = HostVerifier._p2pmem_expected_absent

#: Every check, by name: the one table the host reads (docs/architecture.md, "add a check").
CHECKS: dict[str, CheckEntry] = {
    CheckName.GUEST_MODULES: CheckEntry("default"),
    CheckName.GUEST_SHARES: CheckEntry("default"),
    CheckName.NVDIMM_PRESENT: CheckEntry("default", summaries.nvdimm_present,
                                         lambda v, c, _w: verify_nvdimm(c, v.devices), needs=NVDIMM_NEEDS),
    CheckName.DAX_PERSISTENCE: CheckEntry("default", summaries.dax_persistence, needs=FSDAX_NEEDS),
    CheckName.DAX_FSDAX: CheckEntry("default", summaries.dax_stamp, _only(HostVerifier._verify_stamp),
                                    needs=FSDAX_NEEDS),
    CheckName.DAX_DEVDAX: CheckEntry("default", summaries.dax_stamp, _only(HostVerifier._verify_stamp),
                                     needs=DEVDAX_NEEDS),
    CheckName.DAX_MAP_SYNC: CheckEntry("default", summaries.dax_map_sync, needs=FSDAX_NEEDS),
    CheckName.ZONE_DEVICE_PROBE: CheckEntry("default", summaries.zone_device_probe, _only(HostVerifier._verify_probe),
                                            needs=FSDAX_NEEDS + DEVDAX_NEEDS),
    CheckName.APERTURE_PERSISTENCE: _device(summaries.aperture_persistence),
    CheckName.APERTURE_WINDOW: CheckEntry("default", summaries.aperture_window, _written, error_is_summary=True),
    CheckName.APERTURE_HIDDEN_REFUSED: _device(summaries.aperture_hidden_refused),
    CheckName.P2P_PMEM_TO_DEVICE: _device(summaries.p2p_pmem_to_device),
    CheckName.P2P_DEVICE_TO_PMEM: _device(summaries.p2p_device_to_pmem),
    CheckName.P2P_RAM_TO_DEVICE: _device(summaries.p2p_ram_to_device),
    CheckName.P2P_DEVICE_TO_DEVICE: _device(summaries.p2p_device_to_device),
    CheckName.APERTURE_BAD_DESCRIPTORS: _device(summaries.aperture_bad_descriptors),
    CheckName.ZONE_DEVICE_P2PMEM: CheckEntry("default", summaries.zone_device_p2pmem,
                                             _only(HostVerifier._verify_p2pmem_row), _p2pmem_absent,
                                             needs=P2P_NEEDS),
    CheckName.P2P_NVME_CMB: CheckEntry("default", summaries.p2p_nvme_cmb, _only(HostVerifier._verify_nvme_cmb),
                                       _p2pmem_absent, needs=P2P_NEEDS),
    CheckName.WITNESS_HMM_TESTS: CheckEntry("default", summaries.witness_hmm_tests,
                                            _only(HostVerifier._verify_hmm_tests),
                                            HostVerifier._hmm_tests_expected_absent,
                                            needs=("TEST_HMM", "DEVICE_PRIVATE", "HMM_MIRROR")),
    CheckName.DRIVER_UNLOAD: _driver_check(summaries.driver_unload),
    CheckName.ZONE_DEVICE_WINDOW: _driver_check(summaries.zone_device_window, nvme=True),
    CheckName.HMM_MIGRATE: _driver_check(summaries.hmm_migrate),
    CheckName.HMM_FAULT_BACK: _driver_check(summaries.hmm_fault_back),
    CheckName.P2P_PEER_MAP: _driver_check(summaries.p2p_peer_map, nvme=True),
    CheckName.P2P_PEER_MAP_HIDDEN: _driver_check(summaries.p2p_peer_map_hidden),
    CheckName.P2P_PINNED_VS_REMAP: _driver_check(summaries.p2p_pinned_vs_remap, nvme=True),
    CheckName.REMAP_CONSISTENCY: CheckEntry("remap", summaries.remap_consistency),
    CheckName.APERTURE_FUZZ: CheckEntry("fuzz", summaries.aperture_fuzz, error_is_summary=True),
    # the host's own
    CheckName.REMAP_INTEGRITY: CheckEntry("host", summaries.remap_integrity),
    CheckName.REMAP_HOTPLUG: CheckEntry("host", summaries.remap_hotplug),
    CheckName.HOST_EMULATOR_THREAD: CheckEntry("host"),
    CheckName.GUEST_DMESG: CheckEntry("host", summaries.guest_dmesg),
}


def checks_a_config_runs(kconfig: dict[str, str]) -> dict[str, list[str]]:
    """For each check the default run reports: the kernel options it needs that ``kconfig`` lacks (empty: it runs).
    An option counts when it is y or m."""
    return {name: [opt for opt in entry.needs if kconfig.get(f"CONFIG_{opt}", "n") not in ("y", "m")]
            for name, entry in CHECKS.items() if entry.runs_in == "default"}


def summary_line(name: str, detail: Any) -> str:
    """One human line per check; the full detail is in --json."""
    d = detail if isinstance(detail, dict) else {}
    if d.get("harness"):  # the guest's harness failed the check on its behalf
        return {"crashed": f"its process died of {d.get('signal')} before it reported",
                "timeout": f"no result within its time limit of {d.get('timeout_s')} s (killed)",
                "exited": f"its process exited with status {d.get('status')} before it reported",
                }.get(str(d["harness"]), f"the harness failed it: {d['harness']}")
    if d.get("skip_reason"):
        return f"skipped: {d.get('skip_reason')}"
    entry = CHECKS.get(name)
    if entry is not None and d:
        if entry.error_is_summary and d.get("error"):
            return str(d["error"])
        if entry.summary is not None:
            return entry.summary(d)
    text = json.dumps(detail, separators=(",", ":"))
    return text if len(text) <= 90 else text[:87] + "..."
