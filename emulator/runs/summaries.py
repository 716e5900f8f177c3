"""One human line per check, from its detail (the full detail is in --json): the ``summary`` column of the check
table (results.py ``CHECKS``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aperture.guest.units import format_size


def _host_bytes(d: dict[str, Any]) -> str:
    if d.get("host_mismatches"):
        return f"host found {len(d['host_mismatches'])} regions NOT in device memory"
    return f"host found {d.get('host_verified_regions')} regions in device memory"


def _sub(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    return value if isinstance(value, dict) else {}


def _guest_hex(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


def guest_dmesg(d: dict[str, Any]) -> str:
    reports = [r for r in d.get("reports") or [] if isinstance(r, dict)]
    if not d.get("count"):
        scanned = int(d.get("scanned_bytes", 0))
        return f"no kernel reports ({format_size(scanned) if scanned >= 1024 else f'{scanned} bytes'} of console log)"
    first = reports[0] if reports else {}
    where = next(iter(first.get("decoded") or []), "").strip()
    return (f"{d.get('count')} kernel report(s) ({', '.join(d.get('kinds') or [])}); first: {first.get('header')}"
            + (f" — {where}" if where else ""))


def nvdimm_present(d: dict[str, Any]) -> str:
    regions = d.get("regions") or []
    parts = [f"{r.get('name')} @ {int(r.get('addr', 0)):#x}, {format_size(int(r.get('size', 0)))}"
             for r in regions if isinstance(r, dict)]
    match = "matches QMP" if d.get("matches_qmp") else f"QMP says {d.get('qmp')}"
    return f"{'; '.join(parts) or 'no regions'} ({match})"


def dax_stamp(d: dict[str, Any]) -> str:
    if d.get("error") or d.get("host_error"):
        return str(d.get("error") or d.get("host_error"))
    how = f"{d.get('device')} ({d.get('claim')}, {d.get('action')}{', mkfs' if d.get('mkfs') else ''})"
    where = (f"stamp verified in {Path(str(d.get('host_file'))).name}+{int(d.get('host_offset', 0)):#x}"
             if d.get("host_verified") else "stamp NOT found by the host")
    raw_witness = d.get("ndctl_witness")
    w: dict[str, Any] = raw_witness if isinstance(raw_witness, dict) else {}
    witness = ("" if not w.get("present") else f"; ndctl: {w.get('namespace')} {w.get('mode')}" if w.get("ok")
               else f"; ndctl disagrees: {w.get('why')}")
    return f"{how}; {where}{witness}"


def dax_map_sync(d: dict[str, Any]) -> str:
    if d.get("mmap") != "ok":
        return f"MAP_SYNC mmap: {d.get('mmap')}"
    return (f"MAP_SYNC mmap {d.get('mmap')}, {format_size(int(d.get('bytes', 0)))} written, "
            f"flushed with {d.get('flush')}, read back")


def dax_persistence(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {'kept' if v else 'LOST'}" for k, v in d.items() if isinstance(v, bool)) + \
        f" (previous boot's token {d.get('expected_token')})"


def zone_device_probe(d: dict[str, Any]) -> str:
    rows = d.get("rows") or []
    cells = []
    for r in rows:
        if isinstance(r, dict):
            miss = "" if r.get("matches") else f" (expected {r.get('expected')})"
            cells.append(f"{r.get('memory')}={r.get('result')}{miss}")
    if not cells:
        return f"no O_DIRECT source {d.get('source') or '(no fsdax device)'}: {d.get('source_open')}"
    return "O_DIRECT into: " + ", ".join(cells)


def zone_device_p2pmem(d: dict[str, Any]) -> str:
    if d.get("result") != "ok":
        return f"O_DIRECT into p2pmem: {d.get('result')} {d.get('why') or d.get('expected') or ''}".strip()
    bar = d.get("qmp_nvme_bar")
    return (f"O_DIRECT {d.get('source')} → p2pmem of {d.get('pci')} @ {int(d.get('phys', 0)):#x} "
            f"({'inside the NVMe BAR' + str(bar) + ' per QMP' if bar is not None else 'NOT inside the NVMe CMB'})")


def p2p_nvme_cmb(d: dict[str, Any]) -> str:
    verified = "verified in " + Path(str(d.get("host_file"))).name if d.get("host_verified") else "NOT in the file"
    return (f"{format_size(int(d.get('len', 0)))} CMB → {d.get('device')} +{int(d.get('offset', 0)):#x}: "
            f"{d.get('write')}, back into the CMB: {d.get('read')}; {verified}")


def witness_hmm_tests(d: dict[str, Any]) -> str:
    if d.get("result") != "ran":
        return f"not run: {d.get('why')}"
    failed = d.get("failed_tests") or []
    return (f"hmm-tests: {d.get('passed')} passed, {d.get('failed')} failed, {d.get('skipped')} skipped "
            f"in {d.get('duration_s')} s" + (f" (failed: {', '.join(map(str, failed[:4]))})" if failed else ""))


def remap_consistency(d: dict[str, Any]) -> str:
    return (f"{d.get('remaps')} {d.get('mode')}-mode remaps (p50 {d.get('latency_ms_p50')} ms, p99 "
            f"{d.get('latency_ms_p99')} ms, max {d.get('latency_ms_max')} ms); guest: {d.get('reads')} checked "
            f"reads, {d.get('writes')} stamps, {d.get('violations')} violations, {d.get('seqlock_retries')} "
            f"seqlock retries")


def remap_hotplug(d: dict[str, Any]) -> str:
    return (f"{d.get('remaps')} windows re-plugged (DEVICE_DELETED after {d.get('device_deleted_ms_p50')} ms, "
            f"new device added after {d.get('latency_ms_p50')} ms, p50); guest re-probed {d.get('guest_reprobes')}"
            f" times (avg {d.get('guest_reprobe_ms_avg')} ms, max {d.get('guest_reprobe_ms_max')} ms), "
            f"{d.get('guest_reprobe_failures')} failures")


def remap_integrity(d: dict[str, Any]) -> str:
    return f"{d.get('pages_checked')} pages' last stamps found in device memory; {d.get('mismatch_count')} missing"


def zone_device_window(d: dict[str, Any]) -> str:
    return (f"O_DIRECT {d.get('source')} → window page (P2P, slot {d.get('slot')} @ {_guest_hex(d.get('bus_addr'))}"
            f"): {d.get('result')}; raw BAR mapping: {d.get('bar_row')}; {_host_bytes(d)}")


def hmm_migrate(d: dict[str, Any]) -> str:
    ratio = d.get("migrate_vs_host_memcpy")
    return (f"{format_size(int(d.get('bytes', 0)))} → device memory by device DMA: {d.get('migrated')}/"
            f"{d.get('pages')} pages, {d.get('mb_s')} MB/s (host memcpy {d.get('host_memcpy_mb_s')} MB/s, "
            f"ratio {ratio}); {_host_bytes(d)}")


def hmm_fault_back(d: dict[str, Any]) -> str:
    return (f"CPU touched {format_size(int(d.get('bytes', 0)))}: {d.get('faults')} faults, "
            f"{d.get('pages_to_ram')} pages back by device DMA ({d.get('mb_s')} MB/s), "
            f"{'intact' if d.get('intact') else 'CORRUPTED'}")


def p2p_peer_map(d: dict[str, Any]) -> str:
    lat = _sub(d, "latency")
    return (f"{d.get('mapped')} device-private pages mapped for peers: NVMe → window {d.get('nvme_to_window')}, "
            f"window → NVMe {d.get('window_to_nvme')}, other device's DMA {d.get('device_dma')}; peer map p50 "
            f"{lat.get('map_us_p50')} µs, p99 {lat.get('map_us_p99')} µs; {_host_bytes(d)}")


def p2p_peer_map_hidden(d: dict[str, Any]) -> str:
    return (f"hidden page @ +{_guest_hex(d.get('dev_offset'))}: peer map {d.get('peer_map')}, "
            f"fault back {'intact' if d.get('fault_back_intact') else 'CORRUPTED'}")


def p2p_pinned_vs_remap(d: dict[str, Any]) -> str:
    host = _sub(d, "host_remaps")
    return (f"{d.get('rounds')} rounds of NVMe DMA into {d.get('pages')} pinned pages, {d.get('bad_pages')} bad; "
            f"host: {host.get('remaps')} remaps around the pins (p50 {host.get('latency_ms_p50')} ms, p99 "
            f"{host.get('latency_ms_p99')} ms); {_host_bytes(d)}")


def driver_unload(d: dict[str, Any]) -> str:
    pinned, unpinned = _sub(d, "pinned"), _sub(d, "unpinned")
    return (f"rmmod while pinned: {pinned.get('rmmod')}; when not: {unpinned.get('rmmod')}; "
            f"{'reloaded' if d.get('reloaded') else 'NOT reloaded'}")


def aperture_window(d: dict[str, Any]) -> str:
    devs = d.get("devices") or []
    parts = [f"dev{x.get('device')}: {x.get('survived')}/{x.get('of')} pages survived remaps through "
             f"{x.get('nr_slots')} slots of {format_size(int(x.get('slot_size', 0)))}" for x in devs]
    host = (f"host verified {d.get('host_verified_regions')} written regions in device memory"
            if not d.get("host_mismatches") else f"host found {len(d['host_mismatches'])} regions NOT written")
    return "; ".join(parts) + f"; {host}"


def aperture_persistence(d: dict[str, Any]) -> str:
    return "; ".join(f"dev{x.get('device')}: {x.get('intact')}/{x.get('pages_checked')} pages from the first "
                     "boot intact" for x in d.get("devices") or [])


def aperture_hidden_refused(d: dict[str, Any]) -> str:
    return (f"MAP of hidden pages: {d.get('map_first_hidden')}/{d.get('map_last_hidden')}; device DMA into "
            f"hidden memory: {d.get('device_dma_into_hidden')}, round trip "
            f"{'ok' if d.get('round_trip_ok') else 'FAILED'}")


def p2p_pmem_to_device(d: dict[str, Any]) -> str:
    return (f"{format_size(int(d.get('len', 0)))} devdax @ {int(d.get('src_phys', 0)):#x} → dev{d.get('device')} "
            f"+{int(d.get('dst_device_offset', 0)):#x}: {d.get('status')}, "
            f"{'verified through the window' if d.get('verified_through_window') else 'NOT verified'}")


def p2p_device_to_pmem(d: dict[str, Any]) -> str:
    return (f"{format_size(int(d.get('len', 0)))} dev{d.get('device')} +{int(d.get('src_device_offset', 0)):#x} → "
            f"devdax @ {int(d.get('dst_phys', 0)):#x}: {d.get('status')}, "
            f"{'verified in the devdax mapping' if d.get('verified_in_devdax_mapping') else 'NOT verified'}")


def p2p_ram_to_device(d: dict[str, Any]) -> str:
    return (f"{d.get('pages')} scattered RAM pages ⇄ dev{d.get('device')} by DMA_LIST: in {d.get('ram_to_device')}"
            f", out {d.get('device_to_ram')}")


def p2p_device_to_device(d: dict[str, Any]) -> str:
    return (f"{format_size(int(d.get('len', 0)))} dev{d.get('src_device')} → dev{d.get('dst_device')}'s window "
            f"@ {int(d.get('dst_window_phys', 0)):#x} (page {d.get('dst_page')}): {d.get('status')}, "
            f"{'seen in the peer window' if d.get('seen_in_peer_window') else 'NOT seen'}")


def aperture_fuzz(d: dict[str, Any]) -> str:
    statuses = ", ".join(f"{k} {v}" for k, v in (d.get("statuses") or {}).items())
    changed = d.get("host_files_changed") or []
    return (f"{d.get('descriptors')} descriptors, {d.get('register_writes')} register writes, "
            f"{d.get('index_garbage')} garbage indices, {d.get('results_garbage_lines')} garbage result lines in "
            f"{d.get('duration_s')} s (seed {d.get('seed')}); statuses: {statuses or 'none'}; devices alive "
            f"{d.get('alive')}; {d.get('host_files_checked')} host files "
            f"{'unchanged' if not changed else 'CHANGED: ' + ', '.join(changed)}"
            + (f"; {d.get('remaps')} remaps meanwhile" if d.get("remaps") is not None else ""))


def aperture_bad_descriptors(d: dict[str, Any]) -> str:
    cases = d.get("cases") or []
    bad = [c for c in cases if "expected" in c and c.get("status") != c.get("expected")]
    extra = [c for c in cases if "expected" not in c]
    tail = "; ".join(f"{c.get('case')}: " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "case")
                     for c in extra)
    return f"{len(cases) - len(extra) - len(bad)}/{len(cases) - len(extra)} hostile descriptors refused as " \
           f"expected{'; MISMATCH: ' + str(bad[:2]) if bad else ''}; {tail}"

