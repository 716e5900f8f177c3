"""Benchmarks: figures with units in their names, ratios against a baseline measured in the same run."""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aperture.emulator.config import VmConfig
from aperture.emulator.runs.results import RunResult
from aperture.emulator.runs.run import prepare_inputs
from aperture.emulator.vm.machine import Vm, VmBoot
from aperture.emulator.vm.snapshots import not_snapshottable
from aperture.emulator.vm.warm import BootInputs, ensure_snapshot, ready_vm
from aperture.guest.abi import CheckName, Env
from aperture.guest.errors import ApertureError, GuestError
from aperture.guest.kernelspec import KernelSpec

Progress = Callable[[str], None]


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"{prefix}_p50": round(statistics.median(values), 3), f"{prefix}_min": round(min(values), 3),
            f"{prefix}_max": round(max(values), 3)}


def _boot(config: VmConfig, kernel: KernelSpec, initrd: Path, qemu: str, accel: str) -> tuple[float, float]:
    """One cold boot of the ``probe`` scenario: (seconds to the helper's first message, to poweroff)."""
    with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
        with Vm(config, VmBoot(kernel, initrd, qemu, accel), run_dir=Path(tmp), scenario="probe") as vm:
            for _ in vm.messages():
                pass
            off = vm.wait_poweroff()
            assert vm.boot_s is not None
            return vm.boot_s, off


def bench_boot(config: VmConfig, kernel: KernelSpec, n: int, progress: Progress) -> dict[str, Any]:
    """Cold boots of the chosen kernel and, in the same run and interleaved, of what it is compared with: the
    built kernel against its own bzImage and Debian's kernel; another kernel against its PVH vmlinux. Also
    QEMU start → ready (helper serving commands, DAX configured, NVMe plugged) restored from the warm-start
    snapshot and booted cold, interleaved."""
    inputs = prepare_inputs(config, kernel, progress)
    notes: list[str] = []
    # (figure prefix, kernel, image, label)
    variants: list[tuple[str, KernelSpec, Path, str]] = [("", kernel, inputs.image.path, kernel.kind)]
    if kernel.kind == "built":
        bzimage = kernel.image.parent / "bzImage"
        if bzimage.is_file():
            variants.append(("bzimage_", dataclasses.replace(kernel, image=bzimage), inputs.image.path,
                             "built bzImage"))
        try:
            from aperture.guest.kernel import debian_kernel

            debian = debian_kernel()
            debian_prep = prepare_inputs(config, debian, progress)
            variants.append(("debian_", debian, debian_prep.image.path, f"debian {debian.release}"))
        except ApertureError as exc:
            notes.append(f"Debian's kernel not measured: {exc.one_line()}")
    else:
        from aperture.guest.pvh import extract_pvh_vmlinux

        vmlinux, why = extract_pvh_vmlinux(kernel)
        if vmlinux is not None and vmlinux != kernel.image:
            variants.append(("pvh_", dataclasses.replace(kernel, image=vmlinux), inputs.image.path, "PVH vmlinux"))
        elif vmlinux is None:
            notes.append(f"PVH vmlinux not measured: {why}")
    helper: dict[str, list[float]] = {prefix: [] for prefix, *_ in variants}
    off: dict[str, list[float]] = {prefix: [] for prefix, *_ in variants}
    # Warm start against a cold boot to the same ready state (helper idle, DAX configured, NVMe there).
    snap_why = not_snapshottable(config)
    made_s = None
    if snap_why is None:
        snap, snap_why, made_s = ensure_snapshot(config, inputs, progress)
    ready: dict[str, list[float]] = {"restore": [], "cold": []} if snap_why is None else {}
    running: list[float] = []  # restore: QEMU start → state loaded and running (before clock, env, NVMe)
    for i in range(n):  # interleaved: host noise hits every variant alike
        for prefix, spec, initrd, label in variants:
            h, o = _boot(config, spec, initrd, inputs.qemu, inputs.accel.accel)
            helper[prefix].append(h)
            off[prefix].append(o)
            progress(f"{label} boot {i + 1}/{n}: helper {h:.2f} s, poweroff {o:.2f} s")
        for how in ready:
            with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp, \
                    ready_vm(config, inputs, Path(tmp), lambda _: None, cold=how == "cold") as (_, info):
                if info.start != ("cold" if how == "cold" else "restore"):
                    raise GuestError(f"warm start did not restore: {info.note}")
                ready[how].append(info.ready_s or 0.0)
                if info.restore_s is not None:
                    running.append(info.restore_s)
            progress(f"{how} to ready {i + 1}/{n}: {ready[how][-1]:.2f} s")
    figures: dict[str, float] = {}
    for prefix, *_ in variants:
        figures.update(_stats(f"{prefix}boot_to_helper_s", helper[prefix]))
        figures.update(_stats(f"{prefix}boot_to_poweroff_s", off[prefix]))
    for how, values in ready.items():
        figures.update(_stats(f"{how}_to_ready_s", values))
    if running:
        figures.update(_stats("restore_to_running_s", running))
    if made_s is not None:
        figures["snapshot_made_s"] = round(made_s, 3)
    if snap_why:
        notes.append(f"warm start not measured: {snap_why}")

    def p50(prefix: str) -> float:
        return statistics.median(helper[prefix])

    ratios: dict[str, float] = {"helper_vs_poweroff": round(p50("") / statistics.median(off[""]), 3)}
    if "debian_" in helper:
        ratios["built_vs_debian_boot_to_helper"] = round(p50("") / p50("debian_"), 3)
    if "bzimage_" in helper:
        ratios["pvh_vs_bzimage_boot_to_helper"] = round(p50("") / p50("bzimage_"), 3)
    if "pvh_" in helper:
        ratios["pvh_vs_bzimage_boot_to_helper"] = round(p50("pvh_") / p50(""), 3)
    if ready:
        ratios["restore_vs_cold"] = round(statistics.median(ready["restore"]) / statistics.median(ready["cold"]), 3)
    return {"bench": "boot", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "kernel": kernel.kind, "boots": n, "figures": figures,
            "ratios": ratios, "notes": notes}


def bench_dax(config: VmConfig, kernel: KernelSpec, progress: Progress) -> dict[str, Any]:
    """One boot of the ``bench-dax`` scenario: memcpy into RAM, devdax and fsdax, same boot."""
    inputs = prepare_inputs(config, kernel, progress)
    result = _guest_figures(config, inputs, progress, "bench-dax", "memcpy_ram_MBps")
    f = result.figures
    ram = f["memcpy_ram_MBps"]
    ratios = {}
    if f.get("memcpy_devdax_MBps"):
        ratios["devdax_vs_ram"] = round(f["memcpy_devdax_MBps"] / ram, 3)
    if f.get("memcpy_fsdax_MBps"):
        ratios["fsdax_vs_ram"] = round(f["memcpy_fsdax_MBps"] / ram, 3)
    return {"bench": "dax", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "figures": f, "ratios": ratios,
            "notes": ["1 MiB memcpy repeated for 0.2 s per target, inside the guest; three interleaved rounds, best "
                      "of three per target; RAM buffers are 2 MiB-aligned and THP-advised (effective only if "
                      "the guest's THP setting, noted below, allows)"] + result.messages}


def _eventfd_wakeup_us(rounds: int = 2000) -> float:
    """Median one-way wake-up between two threads through eventfds (what a doorbell costs the host)."""
    import os
    import threading
    import time

    ping, pong = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)

    def echo() -> None:
        for _ in range(rounds):
            os.eventfd_read(ping)
            os.eventfd_write(pong, 1)

    t = threading.Thread(target=echo)
    t.start()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        os.eventfd_write(ping, 1)
        os.eventfd_read(pong)
        samples.append((time.perf_counter() - t0) / 2 * 1e6)
    t.join()
    os.close(ping)
    os.close(pong)
    return statistics.median(samples)


def _copy_MBps(size: int, seconds: float = 0.3) -> float:
    """Host memcpy (ctypes.memmove, one call per ``size`` chunk) over a 64 MiB working set."""
    import ctypes
    import time

    total = 64 << 20
    src, dst = ctypes.create_string_buffer(total), ctypes.create_string_buffer(total)
    base_s, base_d = ctypes.addressof(src), ctypes.addressof(dst)
    chunks = total // size
    moved, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(chunks):
            ctypes.memmove(base_d + i * size, base_s + i * size, size)
        moved += total
    return moved / (time.perf_counter() - t0) / 1e6


def _slot_copy_us(slot: int, rounds: int = 50) -> float:
    """Time for the two slot copies a MAP does (write back + load), with the emulator's own primitive."""
    import time

    a, b, w = bytearray(slot), bytearray(slot), bytearray(slot)
    va, vb, vw = memoryview(a), memoryview(b), memoryview(w)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        va[:] = vw
        vw[:] = vb
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _guest_figures(config: VmConfig, inputs: BootInputs, progress: Progress, scenario: str,
                   needed: str) -> RunResult:
    """Boot a benchmark scenario once (cold: a benchmark's guest runs from boot) and return its RunResult; a
    guest that reported no ``needed`` figure is an error that says what it logged."""
    from aperture.emulator.runs.run import boot_once

    with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
        result = boot_once(config, inputs, Path(tmp), progress, scenario=scenario, guest_env={Env.STAMP: "bench"})
    if not result.figures.get(needed):
        raise GuestError(f"the guest reported no {scenario} figures: " + "; ".join(result.messages[-3:]))
    return result


def bench_device(config: VmConfig, kernel: KernelSpec, progress: Progress) -> dict[str, Any]:
    """Guest-observed MAP round trips and DMA throughput, beside host floors measured in the same run."""


    if not config.devices:
        from aperture.guest.errors import ConfigError

        raise ConfigError("bench device needs at least one aperture device")
    inputs = prepare_inputs(config, kernel, progress)
    progress("measuring host baselines (eventfd wake-up, slot copies, memcpy)")
    wake_us = _eventfd_wakeup_us()
    copy_us = _slot_copy_us(config.devices[0].slot)
    memcpy_4k, memcpy_2m = _copy_MBps(4096), _copy_MBps(2 << 20)
    result = _guest_figures(config, inputs, progress, "bench-device", "map_rtt_us_p50")
    f = result.figures
    floor = wake_us + copy_us
    figures = dict(f)
    figures.update({"host_eventfd_wakeup_us_p50": round(wake_us, 2), "host_two_slot_copy_us_p50": round(copy_us, 2),
                    "map_floor_us": round(floor, 2), "host_memcpy_4k_MBps": round(memcpy_4k, 1),
                    "host_memcpy_2m_MBps": round(memcpy_2m, 1)})
    ratios = {"map_rtt_vs_floor": round(f["map_rtt_us_p50"] / floor, 3),
              "dma_4k_vs_memcpy": round(f.get("dma_4k_MBps", 0) / memcpy_4k, 3),
              "dma_2m_vs_memcpy": round(f.get("dma_2m_MBps", 0) / memcpy_2m, 3)}
    return {"bench": "device", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "figures": figures, "ratios": ratios,
            "notes": ["MAP: guest clock around MAP(slot 0, alternating pages), 1000 rounds; each MAP copies two "
                      "2 MiB slots on the host", "DMA 2 MiB: device-local → devdax, 32 per doorbell; 4 KiB: DMA_LIST "
                      "of 1024 scattered RAM pages → device; both timed by the guest",
                      "host memcpy: ctypes.memmove per chunk over 64 MiB"] + result.messages}


def bench_driver(config: VmConfig, kernel: KernelSpec, progress: Progress) -> dict[str, Any]:
    """The guest driver: migration and fault-back throughput against the host's memcpy, peer-map latency against
    the MAP floor (an eventfd wake-up plus the two slot copies a MAP does), all measured in the same run."""
    from aperture.guest.driver_build import driver_missing
    from aperture.guest.errors import ConfigError, SetupError


    if not config.devices:
        raise ConfigError("bench driver needs at least one aperture device")
    why = driver_missing(kernel)
    if why is not None:
        raise SetupError(f"bench driver: {why}")
    inputs = prepare_inputs(config, kernel, progress)
    progress("measuring host baselines (memcpy 4 KiB and 2 MiB, eventfd wake-up, slot copies)")
    memcpy_4k, memcpy_2m = _copy_MBps(4096), _copy_MBps(2 << 20)
    floor = _eventfd_wakeup_us() + _slot_copy_us(config.devices[-1].slot)
    result = _guest_figures(config, inputs, progress, "bench-driver", "migrate_64m_MBps")
    f = result.figures
    figures = dict(f)
    figures.update({"host_memcpy_4k_MBps": round(memcpy_4k, 1), "host_memcpy_2m_MBps": round(memcpy_2m, 1),
                    "map_floor_us": round(floor, 2)})
    ratios = {"migrate_vs_memcpy_4k": round(f["migrate_64m_MBps"] / memcpy_4k, 4),
              "fault_back_vs_memcpy_4k": round(f.get("fault_back_MBps", 0) / memcpy_4k, 5),
              "peer_map_evict_vs_map_floor": round(f.get("peer_map_evict_us_p50", 0) / floor, 3)}
    return {"bench": "driver", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "figures": figures, "ratios": ratios,
            "notes": ["migrate: 64 MiB of pattern-filled anonymous memory per round (3 rounds, median), 512 pages "
                      "per DMA_LIST, guest clock around the ioctl; fault back: the CPU reads the first 8 MiB, one "
                      "device DMA per 4 KiB page",
                      "peer map: 1000 rounds over 16 device pages 2 MiB apart (more than the window's slots, so "
                      "each map evicts: MAP copies two slots on the host), then a second page of the same device "
                      "page (its slot is already mapped: a pin and a seqlock read)",
                      "host memcpy: ctypes.memmove per chunk over 64 MiB"] + result.messages}


def bench_remap(config: VmConfig, kernel: KernelSpec, progress: Progress, rounds: int = 200) -> dict[str, Any]:
    """Pause-mode remap latency beside bare QMP stop+cont, both measured on one idle VM in the same run."""
    import time

    from aperture.guest.errors import ConfigError
    from aperture.qmp_client.remap import RemapController, random_moves

    if not config.devices:
        raise ConfigError("bench remap needs at least one aperture device")
    inputs = prepare_inputs(config, kernel, progress)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
        with Vm(config, inputs.boot(), run_dir=Path(tmp), scenario="idle") as vm:
            assert vm.qmp is not None and vm.service is not None
            vm.wait_idle()
            progress(f"guest idle; {rounds} rounds of: bare stop+cont, a bare retarget, a pause-mode remap")
            dev0 = vm.service.devices[0]
            ctl = RemapController(vm.qmp, [dev0], every=1.0, seed=1)
            ctl.max_slots = 1
            # Warm-up (untimed): touch every exposable page once, so first-touch page faults on the sparse
            # device-memory file are not billed to the steady-state remap.
            for page in range(dev0.config.nr_pages):
                if not dev0.config.page_hidden(page):
                    dev0.retarget({0: page})
            dev0.retarget({0: None})
            bare: list[float] = []
            copy: list[float] = []
            one_slot: list[float] = []
            rng = random.Random(2)
            for _ in range(rounds):  # interleaved: all three see the same machine state
                t0 = time.perf_counter()
                vm.qmp.stop()
                vm.qmp.cont()
                bare.append((time.perf_counter() - t0) * 1e3)
                with dev0.lock:  # the same work the remap does inside its pause (the guest is idle)
                    moves = random_moves(dev0, rng, 1)
                    t0 = time.perf_counter()
                    dev0.retarget(moves)
                    copy.append((time.perf_counter() - t0) * 1e3)
                one_slot.append(ctl.remap_once())
    hotplug_ms: list[float] = []
    deleted_ms: list[float] = []
    notes = ["one slot per remap: stop → write back + load 1 slot → cont; the guest is idle; device memory pages "
             "were touched once before timing (steady state)",
             "baselines interleaved with the remaps: bare QMP stop+cont, and the retarget alone (write back + load "
             "one slot of a random page, as cold as in the remap) for the _plus_copy ratio"]
    from aperture.qmp_client.qemu import hotplug_supported

    if hotplug_supported(inputs.qemu):
        hp_config = dataclasses.replace(config, window_hotplug=True)
        with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
            with Vm(hp_config, inputs.boot(), run_dir=Path(tmp), scenario="idle") as vm:
                assert vm.qmp is not None and vm.service is not None
                vm.wait_idle()
                progress("20 hotplug-mode remaps (re-plug the window at another device-memory offset)")
                hp = RemapController(vm.qmp, vm.service.devices, every=1.0, mode="hotplug", seed=2)
                hp.on_replug = vm.service.invalidate_map
                for _ in range(20):
                    hotplug_ms.append(hp.hotplug_once())
                deleted_ms = hp.stats.deleted_ms
        notes.append("hotplug: object-add backend at the new offset → device_del → DEVICE_DELETED → object-del → "
                     "device_add (ACPI hotplug on a pcie-root-port); the guest's re-probe time is reported by "
                     "`aperture run --remap-mode hotplug` (remap.hotplug)")
    else:
        notes.append("hotplug not measured: this QEMU's memory-backend-file has no 'offset'")
    copy_ms = statistics.median(copy)
    if hotplug_ms:
        figures.update(_stats("remap_hotplug_ms", hotplug_ms))
        figures.update(_stats("hotplug_device_deleted_ms", deleted_ms))
    figures.update(_stats("stopcont_ms", bare))
    figures.update(_stats("remap_pause_ms", one_slot))
    figures["remap_pause_ms_p99"] = round(sorted(one_slot)[int(0.99 * len(one_slot)) - 1], 3)
    figures["stopcont_ms_p99"] = round(sorted(bare)[int(0.99 * len(bare)) - 1], 3)
    figures.update(_stats("retarget_ms", copy))
    p50_bare, p50_remap = statistics.median(bare), statistics.median(one_slot)
    ratios = {"remap_pause_vs_stopcont": round(p50_remap / p50_bare, 3),
              "remap_pause_vs_stopcont_plus_copy": round(p50_remap / (p50_bare + copy_ms), 3)}
    return {"bench": "remap", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "figures": figures, "ratios": ratios,
            "notes": notes}


def _rss_mib(field: str = "RssAnon") -> float:
    """This process's resident memory of one kind, in MiB. RssAnon is our own heap: it is what must stay contiguous.
    (RssShmem and RssFile grow as the device model touches guest RAM and device memory: pages of files.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_soak(config: VmConfig, kernel: KernelSpec, duration: float, progress: Progress) -> dict[str, Any]:
    """The hostile-guest fuzzer against both devices with host remaps every 20 ms for ``duration``: this process's
    memory (the device model, the results channel, the remap driver) must stay contiguous. The baseline is the same
    run's first quarter."""
    import threading

    from aperture.emulator.config import RemapPlan
    from aperture.emulator.runs.run import run_vm

    inputs = prepare_inputs(config, kernel, progress)
    samples: list[tuple[float, float]] = []  # (seconds, RssAnon MiB)
    shared: list[float] = []  # RssShmem + RssFile MiB, for the report
    stop = threading.Event()

    def sample() -> None:
        import time

        t0 = time.monotonic()
        while not stop.wait(1.0):
            samples.append((time.monotonic() - t0, _rss_mib("RssAnon")))
            shared.append(_rss_mib("RssShmem") + _rss_mib("RssFile"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    config = dataclasses.replace(config, run_timeout=max(config.run_timeout, duration + 120))
    try:
        with tempfile.TemporaryDirectory(prefix="aperture-soak-") as tmp:
            result = run_vm(config, inputs, Path(tmp), progress, remap=RemapPlan(every=0.02, duration=duration),
                            fuzz=duration)
    finally:
        stop.set()
        sampler.join()
    fuzz = next((c for c in result.checks if c.name == CheckName.APERTURE_FUZZ), None)
    detail = fuzz.detail if fuzz is not None and isinstance(fuzz.detail, dict) else {}
    rss = [r for _, r in samples]
    quarter = max(len(rss) // 4, 1)
    first, last = statistics.median(rss[:quarter] or [0.0]), statistics.median(rss[-quarter:] or [0.0])
    figures = {"duration_s": float(detail.get("duration_s", duration)),
               "descriptors_fuzzed": float(detail.get("descriptors", 0)),
               "descriptors_per_s": round(float(detail.get("descriptors", 0)) / max(duration, 1e-9), 1),
               "remaps": float(detail.get("remaps", 0)),
               "results_garbage_lines": float(detail.get("results_garbage_lines", 0)),
               "host_anon_rss_mib_first_quarter_p50": round(first, 1),
               "host_anon_rss_mib_last_quarter_p50": round(last, 1),
               "host_anon_rss_mib_max": round(max(rss or [0.0]), 1),
               "host_file_and_shmem_rss_mib_max": round(max(shared or [0.0]), 1)}
    return {"bench": "soak", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "ok": result.ok, "figures": figures,
            "ratios": {"host_anon_rss_last_vs_first_quarter": round(last / first, 3) if first else 0.0},
            "notes": [f"aperture.fuzz {'ok' if fuzz is not None and fuzz.ok else 'FAILED'}: devices alive "
                      f"{detail.get('alive')}, host files changed {detail.get('host_files_changed')}"]
            + result.messages[:5]}


#: The guest side of `bench share`: each operation once on the share and once on the guest's own RAM-backed
#: root (the baseline, same boot, same sizes), timed with /proc/uptime (10 ms ticks; every step takes seconds).
SHARE_SCRIPT = r"""
set -e
t() { cut -d' ' -f1 /proc/uptime; }
dd if=/dev/zero of=/tmp/big bs=1M count=$MIB 2>/dev/null
mkdir -p /tmp/tree && cd /tmp/tree && i=0
while [ $i -lt $FILES ]; do mkdir -p d$((i / 100)); echo $i > d$((i / 100))/f$i; i=$((i + 1)); done
sync; echo 3 > /proc/sys/vm/drop_caches
a=$(t); cat /share/big > /dev/null; b=$(t)
c=$(t); find /share/tree -type f -exec stat -c %s {} + > /dev/null; d=$(t)
e=$(t); cat /tmp/big > /dev/null; f=$(t)
g=$(t); find /tmp/tree -type f -exec stat -c %s {} + > /dev/null; h=$(t)
echo "FIGURES $a $b $c $d $e $f $g $h"
"""


def bench_share(config: VmConfig, kernel: KernelSpec, progress: Progress, mib: int = 256,
                files: int = 10_000) -> dict[str, Any]:
    """--share (9p, QEMU's virtio-9p-pci): a sequential read of ``mib`` MiB and find + stat over ``files`` small
    files, against the same on the guest's RAM-backed root in the same boot."""
    from aperture.emulator.config import ShareConfig
    from aperture.emulator.runs.oneshot import run_command
    from aperture.guest.errors import GuestError

    with tempfile.TemporaryDirectory(prefix="aperture-bench-") as tmp:
        share = Path(tmp) / "share"
        (share / "tree").mkdir(parents=True)
        progress(f"host: a {mib} MiB file and {files} small files to share")
        with open(share / "big", "wb") as f:
            f.truncate(0)
            block = random.randbytes(1 << 20)
            for _ in range(mib):
                f.write(block)
        for i in range(files):
            d = share / "tree" / f"d{i // 100}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}").write_text(f"{i}\n")
        config = dataclasses.replace(config, shares=(ShareConfig(share, "/share", readonly=True),),
                                     memory=max(config.memory, (mib + 512) << 20), run_timeout=900)
        inputs = prepare_inputs(config, kernel, progress)
        out: list[bytes] = []
        script = SHARE_SCRIPT.replace("$MIB", str(mib)).replace("$FILES", str(files))
        result = run_command(config, inputs, Path(tmp) / "run", progress, ("sh", "-c", script), cwd=None,
                             with_checks=False, on_output=lambda _stream, data: out.append(data))
    text = b"".join(out).decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("FIGURES ")), None)
    if result.rc != 0 or line is None:
        raise GuestError(f"the share benchmark failed in the guest (status {result.rc}): {text[-300:]}")
    marks = [float(x) for x in line.split()[1:9]]  # uptime before and after each of the four steps
    read_s, stat_s = marks[1] - marks[0], marks[3] - marks[2]
    base_read_s, base_stat_s = max(marks[5] - marks[4], 0.01), max(marks[7] - marks[6], 0.01)
    figures = {"share_read_MBps": round(mib / max(read_s, 0.01), 1), "share_read_s": round(read_s, 2),
               "share_find_stat_s": round(stat_s, 2), "tmpfs_read_MBps": round(mib / base_read_s, 1),
               "tmpfs_find_stat_s": round(base_stat_s, 2)}
    ratios = {"share_vs_tmpfs_read_MBps": round(figures["share_read_MBps"] / figures["tmpfs_read_MBps"], 3),
              "share_vs_tmpfs_find_stat_s": round(stat_s / base_stat_s, 2)}
    return {"bench": "share", "accel": inputs.accel.accel, "qemu_version": inputs.qemu_version,
            "kernel_release": kernel.release, "figures": figures, "ratios": ratios,
            "notes": [f"9p (virtio-9p-pci, msize 512 KiB), a read-only share (cache=loose; read-write shares use "
                      f"cache=mmap, write-through); {mib} MiB read with cat, "
                      f"find -exec stat over {files} files in {files // 100} directories; baseline: the same on "
                      "the guest's RAM-backed root, same boot; guest page cache dropped first"]}
