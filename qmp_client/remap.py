"""Host-driven window remaps while the guest works.

``pause`` mode: QMP ``stop`` → the emulator retargets slots (write back, load, seqlock generation += 2) →
``cont``. The guest cannot observe a half-done remap: it is not running while the slot changes.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aperture.guest.errors import ConfigError

from .qemu import port_id, win_backend_id, win_id
from .session import SyncQmpSession

UNSAFE_GAP_S = 0.001  # negative control: how long an unsafe remap leaves the table ahead of the data
MAX_LATENCY_SAMPLES = 100_000  # per run: a reservoir beyond that (a long soak must not grow the host)


class WindowGeometry(Protocol):
    """What the remap driver reads of a device's configuration."""

    @property
    def nr_slots(self) -> int: ...
    @property
    def nr_pages(self) -> int: ...
    @property
    def window(self) -> int: ...
    def page_hidden(self, page: int) -> bool: ...
    def window_offsets(self) -> list[int]: ...


class WindowState(Protocol):
    """The slot table the device model keeps for a window."""

    @property
    def slots(self) -> list[int | None]: ...
    @property
    def direct_offset(self) -> int | None: ...
    def announce(self, moves: dict[int, int | None]) -> None: ...
    def begin_transition(self) -> None: ...
    def set_direct(self, offset: int) -> None: ...


class BackingFile(Protocol):
    @property
    def path(self) -> Path: ...


class RemappableDevice(Protocol):
    """What the remap driver needs of a device model: it lives in emulator/, which satisfies this without
    qmp_client importing it (layers point down)."""

    @property
    def index(self) -> int: ...
    @property
    def config(self) -> WindowGeometry: ...
    @property
    def window(self) -> WindowState: ...
    @property
    def devmem(self) -> BackingFile: ...
    @property
    def lock(self) -> AbstractContextManager[Any]: ...
    def slot_pinned(self, slot: int) -> bool: ...
    def retarget(self, moves: dict[int, int | None], seqlock: bool = True,
                 skip_pinned: bool = False) -> dict[int, int | None]: ...


@dataclass
class RemapStats:
    mode: str
    remaps: int = 0
    slots_moved: int = 0
    skipped_pinned: int = 0  # slots a remap left alone: the guest's driver had pinned them (SLOT_PIN)
    remaps_with_pins: int = 0  # remaps done while some slot of the device was pinned (chosen among the rest)
    latencies_ms: list[float] = field(default_factory=list)
    deleted_ms: list[float] = field(default_factory=list)  # hotplug: device_del → DEVICE_DELETED
    errors: list[str] = field(default_factory=list)
    latency_ms_max: float = 0.0
    _seen: int = 0

    def add_latency(self, ms: float) -> None:
        """Keep every sample up to MAX_LATENCY_SAMPLES, then a uniform reservoir of that many: percentiles of a
        run of any length from bounded memory (the maximum is kept exactly)."""
        self._seen += 1
        self.latency_ms_max = max(self.latency_ms_max, ms)
        if len(self.latencies_ms) < MAX_LATENCY_SAMPLES:
            self.latencies_ms.append(ms)
        else:
            k = random.randrange(self._seen)
            if k < MAX_LATENCY_SAMPLES:
                self.latencies_ms[k] = ms

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

        out = {"mode": self.mode, "remaps": self.remaps, "slots_moved": self.slots_moved,
               "skipped_pinned": self.skipped_pinned, "remaps_with_pins": self.remaps_with_pins,
               "latency_ms_p50": round(statistics.median(lat), 3) if lat else None,
               "latency_ms_p99": pct(0.99), "latency_ms_max": round(self.latency_ms_max, 3) if lat else None,
               "errors": self.errors[:10]}
        if self.deleted_ms:
            out["device_deleted_ms_p50"] = round(statistics.median(self.deleted_ms), 3)
        return out


def pause_retarget(qmp: SyncQmpSession, device: RemappableDevice, moves: dict[int, int | None],
                   skip_pinned: bool = False) -> float:
    """The pause-mode remap: QMP stop → retarget (under the device lock) → cont. Returns milliseconds.

    The guest's pins are read while the VM is stopped, so a pin the driver wrote before the stop is seen and
    none can appear during the retarget; a pinned slot is refused (EBUSY) or, with ``skip_pinned``, left out."""
    return pause_retarget_moves(qmp, device, moves, skip_pinned)[0]


def pause_retarget_moves(qmp: SyncQmpSession, device: RemappableDevice, moves: dict[int, int | None],
                         skip_pinned: bool = False) -> tuple[float, dict[int, int | None]]:
    """``pause_retarget``, also returning the moves done."""
    with device.lock:
        t0 = time.perf_counter()
        qmp.stop()
        try:
            done = device.retarget(moves, skip_pinned=skip_pinned)
        finally:
            qmp.cont()
        return (time.perf_counter() - t0) * 1e3, done


def random_moves(device: RemappableDevice, rng: random.Random, max_slots: int = 2) -> dict[int, int | None]:
    """Pick 1..max_slots slots of ``device`` the guest has not pinned, and exposable pages not live elsewhere
    (no slots at all when every slot is pinned)."""
    cfg = device.config
    free_slots = [s for s in range(cfg.nr_slots) if not device.slot_pinned(s)]
    slots = rng.sample(free_slots, k=min(len(free_slots), rng.randint(1, max_slots)))
    while True:
        busy = {p for s, p in enumerate(device.window.slots) if p is not None and s not in slots}
        free = [p for p in range(cfg.nr_pages) if not cfg.page_hidden(p) and p not in busy]
        if len(free) >= len(slots):
            break
        slots = slots[: len(free)]  # fewer exposable pages than slots: move fewer slots, recompute
    pages = rng.sample(free, k=len(slots))
    return dict(zip(slots, pages, strict=True))


class RemapController:
    """A thread that remaps random slots of random devices every ``every`` seconds until stopped."""

    def __init__(self, qmp: SyncQmpSession, devices: Sequence[RemappableDevice], every: float, mode: str = "pause",
                 seed: int | None = None) -> None:
        self.hotplug = mode == "hotplug"
        self._memdev: dict[int, str] = {}
        self._serial = 0
        #: called after each hotplug remap (e.g. to drop a cached address map)
        self.on_replug: Callable[[], None] | None = None
        if mode not in ("pause", "hotplug", "unsafe"):
            raise ConfigError(f"remap mode {mode!r} is not supported by this controller")
        # "unsafe" (APERTURE_REMAP_MODE=unsafe) is a negative control: retarget without pausing the guest and
        # without the seqlock, to show that the guest's checks do catch torn remaps. Never a user-facing mode.
        self.pause = mode != "unsafe"
        self.max_slots = 2
        self.qmp = qmp
        self.devices = devices
        self.every = every
        self.stats = RemapStats(mode)
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def remap_once(self) -> float:
        """One pause-mode remap (or, as a negative control, an unsafe one); returns its latency in ms."""
        device = self.rng.choice(self.devices)
        if self.pause:
            with device.lock:  # the guest's own MAP commands wait: the chosen pages stay free
                pinned = sum(device.slot_pinned(s) for s in range(device.config.nr_slots))
                wanted = random_moves(device, self.rng, self.max_slots)
                if not wanted:  # every slot pinned: nothing to move, no reason to stop the guest
                    self.stats.skipped_pinned += pinned
                    return 0.0
                ms, moves = pause_retarget_moves(self.qmp, device, wanted, skip_pinned=True)
            self.stats.skipped_pinned += len(wanted) - len(moves)
            self.stats.remaps_with_pins += bool(pinned)
        else:
            moves, ms = self._unsafe_remap(device)
        self.stats.remaps += 1
        self.stats.slots_moved += len(moves)
        self.stats.add_latency(ms)
        return ms

    def _unsafe_remap(self, device: RemappableDevice) -> tuple[dict[int, int | None], float]:
        """Negative control: announce the new table, let the guest run, then move the data (no pause, no
        seqlock). The gap stands in for a slow copy; the lock is not held across it, so the guest keeps
        reading and DMAing through the torn window instead of waiting behind it, and the checks see it."""
        t0 = time.perf_counter()
        with device.lock:
            moves = random_moves(device, self.rng, self.max_slots)
            device.window.announce(moves)
        time.sleep(min(UNSAFE_GAP_S, self.every / 2))
        with device.lock:
            device.retarget(moves, seqlock=False, skip_pinned=True)
        return moves, (time.perf_counter() - t0) * 1e3

    def hotplug_once(self) -> float:
        """Zero-copy retarget of a whole window: plug a new memory-backend-file (device memory at another
        offset) in place of the window device. Returns ms from the start to the new device being added."""
        device = self.rng.choice(self.devices)
        cfg, i = device.config, device.index
        current = device.window.direct_offset
        offsets = [off for off in cfg.window_offsets() if off != current]
        offset = self.rng.choice(offsets)
        self._serial += 1
        old_id, new_id = self._memdev.get(i, win_backend_id(i)), win_backend_id(i, self._serial)
        session = self.qmp.session
        t0 = time.perf_counter()
        with device.lock:
            device.window.begin_transition()
        self.qmp.call(session.object_add("memory-backend-file", new_id, **{
            "mem-path": str(device.devmem.path), "size": cfg.window, "offset": offset, "share": True}))
        self.qmp.call(session.wait_event("DEVICE_DELETED", 15.0, trigger=session.device_del(win_id(i)),
                                         match={"device": win_id(i)}), timeout=20)
        self.stats.deleted_ms.append((time.perf_counter() - t0) * 1e3)
        self.qmp.call(session.object_del(old_id))
        self.qmp.call(session.device_add("ivshmem-plain", win_id(i), memdev=new_id, bus=port_id(i), master="on"))
        self._memdev[i] = new_id
        with device.lock:
            device.window.set_direct(offset)
        if self.on_replug is not None:
            self.on_replug()
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.remaps += 1
        self.stats.slots_moved += cfg.nr_slots
        self.stats.add_latency(ms)
        return ms

    def _loop(self) -> None:
        next_at = time.monotonic() + self.every
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.every
            try:
                self.hotplug_once() if self.hotplug else self.remap_once()
            except Exception as exc:  # noqa: BLE001 - QEMU gone, etc.: record and stop remapping
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="aperture-remap", daemon=True)
        self._thread.start()

    def stop(self) -> RemapStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        return self.stats
