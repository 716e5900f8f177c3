"""Warm-start snapshots: a VM saved in its ready state (helper idle, DAX configured, devices untouched), kept in
the cache under a key of everything that can change the guest or the machine.

A snapshot is a directory ``<cache>/snapshots/<key>/`` holding ``state.mig`` (QEMU's state, migrated to a file
with ``mapped-ram``: guest RAM, NVDIMM contents, control memory and every device's state) and ``meta.json``
(what it was made from, its size and checksums of its small parts). Nothing else is needed: the device-memory
files are untouched at the ready state (checked when the snapshot is made), so a restore starts them empty,
and QEMU writes RAM and NVDIMM contents into the restoring run's own files. The NVMe controller cannot be
migrated: snapshots are made without it and a restore hot-plugs it into its root port.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aperture.emulator.config import VmConfig, config_to_dict
from aperture.emulator.runpaths import RunPaths
from aperture.emulator.vm.qemu_argv import build_argv, kernel_cmdline
from aperture.guest.abi import Env
from aperture.guest.cache import cache_root, mtime_or_zero
from aperture.guest.errors import GuestError
from aperture.guest.kernelspec import KernelSpec
from aperture.guest.units import GiB

#: Bump when a snapshot's layout or what makes its key changes: older ones are then never used.
SNAPSHOT_FORMAT = 3  # 3: the CRC of all data (state_data_crc32); 2: the key covers the device model configuration
#: The stamp token a snapshot's guest booted with; a restored guest gets its run's token over the command port.
SNAPSHOT_TOKEN = "snapshot"
STATE_FILE = "state.mig"
META_FILE = "meta.json"
#: Bytes hashed at each end of the state file (its header and the device state around the RAM pages).
CHECKSUM_SPAN = 4 << 20
#: The cache keeps the newest snapshots up to this many bytes allocated on disk (and at most KEEP of them).
MAX_BYTES = 4 * GiB
KEEP = 6

Progress = Callable[[str], None]


def snapshots_dir(root: Path | None = None) -> Path:
    """``<cache>/snapshots``, or ``$APERTURE_SNAPSHOTS`` (e.g. a CI cache directory of its own)."""
    if root is None and os.environ.get("APERTURE_SNAPSHOTS"):
        return Path(os.environ["APERTURE_SNAPSHOTS"]).expanduser().resolve()
    return (root or cache_root()) / "snapshots"


def not_snapshottable(config: VmConfig, run_dir: Path | None = None) -> str | None:
    """Why a VM of this configuration starts cold, or None."""
    if config.shares:
        return "--share: 9p shares cannot be migrated"
    if config.gdb != "off":
        return "--gdb: the kernel is debugged from its first instruction"
    if config.window_hotplug:
        return "--remap-mode hotplug: the window topology is re-plugged"
    if run_dir is not None and any(run_dir.glob("pmem*.img")):
        return f"{run_dir} holds NVDIMM contents from an earlier run: a restore would replace them"
    return None


@dataclass(frozen=True)
class SnapshotKey:
    """The key and what it was computed from (kept in meta.json, shown by `aperture snapshot ls`)."""

    key: str
    inputs: dict[str, Any]


def snapshot_key(config: VmConfig, kernel: KernelSpec, image_digest: str, qemu: str, qemu_version: str,
                 accel: str) -> SnapshotKey:
    """Everything that can change the guest's state or the machine: the image (helper, init, modules), the
    kernel, QEMU, the accelerator and the whole command line of a snapshot's VM, paths made canonical."""
    paths = RunPaths(Path("/run"), "snapshot", Path("/shm"), Path("/sock"))
    argv = build_argv("qemu", config, kernel, Path("/initrd"), paths, accel,
                      kernel_cmdline(config, "idle", {Env.STAMP: SNAPSHOT_TOKEN}), command_channel=True,
                      plug_nvme=False)
    st = kernel.image.stat()
    # The machine: the command line does not show everything the device model puts into the guest (device
    # memory sizes, slot sizes and hidden ranges live in control memory, which the snapshot carries).
    machine = {k: v for k, v in config_to_dict(config).items()
               if k not in ("boot_timeout", "run_timeout", "shares", "accel")}
    inputs = {"format": SNAPSHOT_FORMAT, "machine": machine, "image": image_digest, "kernel": str(kernel.image),
              "kernel_release": kernel.release, "kernel_size": st.st_size, "kernel_mtime_ns": st.st_mtime_ns,
              "qemu": qemu, "qemu_version": qemu_version, "accel": accel, "argv": argv[1:]}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return SnapshotKey(digest, inputs)


def _ends_digest(path: Path) -> str:
    """sha256 of the first and last CHECKSUM_SPAN bytes: a truncated or overwritten file is caught cheaply."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(CHECKSUM_SPAN))
        f.seek(max(size - CHECKSUM_SPAN, 0))
        h.update(f.read(CHECKSUM_SPAN))
    return h.hexdigest()


def data_crc32(path: Path) -> int:
    """CRC-32 of every data extent of the (sparse) state file, with each extent's offsets: any changed byte of
    what a restore reads is caught — about 30 ms for the ~55 MB a default VM's state holds (a full sha256 took
    ~180 ms; integrity against accidents, not an attacker, is the point)."""
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            crc = zlib.crc32(f"{start}:{end};".encode(), crc)
            pos = start
            while pos < end:
                block = os.pread(fd, min(end - pos, 16 << 20), pos)
                if not block:
                    break
                crc = zlib.crc32(block, crc)
                pos += len(block)
            offset = end
    finally:
        os.close(fd)
    return crc


def _meta_digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"},
                                     sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def key(self) -> str:
        return self.directory.name


def check_snapshot(directory: Path, key: SnapshotKey | None = None) -> tuple[Snapshot | None, str | None]:
    """The snapshot in ``directory`` if it is whole and (given ``key``) made from the same inputs; else why not.
    Checked before every use: format, key, meta checksum, the state file's size, the checksum of its ends and
    the CRC of all its data."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except FileNotFoundError:
        return None, None  # none yet
    except (OSError, ValueError) as exc:
        return None, f"snapshot {directory.name}: unreadable meta.json ({exc})"
    if not isinstance(meta, dict) or meta.get("meta_sha256") != _meta_digest(meta):
        return None, f"snapshot {directory.name}: meta.json fails its checksum"
    if meta.get("format") != SNAPSHOT_FORMAT:
        return None, f"snapshot {directory.name}: format {meta.get('format')}, this aperture reads {SNAPSHOT_FORMAT}"
    if key is not None and (meta.get("key") != key.key or meta.get("inputs") != key.inputs):
        return None, f"snapshot {directory.name}: made from other inputs"
    state = directory / STATE_FILE
    try:
        size = state.stat().st_size
    except FileNotFoundError:
        return None, f"snapshot {directory.name}: {STATE_FILE} is missing"
    if size != meta.get("state_size"):
        return None, f"snapshot {directory.name}: {STATE_FILE} is {size} bytes, {meta.get('state_size')} expected " \
                     "(truncated?)"
    if _ends_digest(state) != meta.get("state_ends_sha256") or data_crc32(state) != meta.get("state_data_crc32"):
        return None, f"snapshot {directory.name}: {STATE_FILE} fails its checksum (corrupt)"
    return Snapshot(directory, meta), None


def find_snapshot(key: SnapshotKey, root: Path | None = None) -> tuple[Snapshot | None, str | None]:
    """(snapshot, None) to use; (None, None) when there is none yet; (None, why) when the one there is unusable
    (it is removed, so the next run makes a new one)."""
    directory = snapshots_dir(root) / key.key
    drop_dead_saves(directory.parent)  # a run killed mid-save leaves its copy: the next run removes it
    snap, why = check_snapshot(directory, key)
    if why is not None:
        shutil.rmtree(directory, ignore_errors=True)
    elif snap is not None:
        os.utime(directory)  # recently used: pruned last
    return snap, why


@contextlib.contextmanager
def builder_lock(key: SnapshotKey, wait_s: float = 0.0, root: Path | None = None) -> Iterator[bool]:
    """One builder per snapshot: yields True to the process that may make ``key`` (holding the lock), False when
    another process is making it and did not finish within ``wait_s`` (then boot cold, or look again)."""
    base = snapshots_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{key.key}.lock", "a+") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_snapshot(key: SnapshotKey, save: Callable[[Path], float], root: Path | None = None,
                   extra: dict[str, Any] | None = None) -> Snapshot:
    """Save into a private directory, then rename it into place (two runs making the same snapshot at once: the
    first rename wins, the other's copy is dropped)."""
    base = snapshots_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{key.key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    tmp.mkdir()
    try:
        save_s = save(tmp / STATE_FILE)
        state = tmp / STATE_FILE
        meta: dict[str, Any] = {"format": SNAPSHOT_FORMAT, "key": key.key, "inputs": key.inputs,
                                "created": time.time(), "save_s": round(save_s, 3),
                                "state_size": state.stat().st_size, "state_ends_sha256": _ends_digest(state),
                                "state_data_crc32": data_crc32(state),
                                **(extra or {})}
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        final = base / key.key
        try:
            tmp.rename(final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            snap, why = check_snapshot(final, key)
            if snap is None:
                raise GuestError(f"snapshot {key.key}: another run's copy is unusable: {why}") from exc
            return snap
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root)
    return Snapshot(final, meta)


def allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def list_snapshots(root: Path | None = None) -> list[dict[str, Any]]:
    """Every snapshot in the cache, newest use first, with whether it is usable."""
    base = snapshots_dir(root)
    out = []
    for d in sorted((d for d in base.glob("*") if d.is_dir() and not d.name.startswith(".")), key=mtime_or_zero,
                    reverse=True):
        snap, why = check_snapshot(d)
        meta = snap.meta if snap else {}
        inputs = meta.get("inputs", {})
        out.append({"key": d.name, "ok": snap is not None, "why": why, "path": str(d),
                    "allocated_bytes": allocated(d), "state_size": meta.get("state_size"),
                    "created": meta.get("created"), "kernel_release": inputs.get("kernel_release"),
                    "qemu_version": inputs.get("qemu_version"), "accel": inputs.get("accel"),
                    "image": inputs.get("image")})
    return out


def drop_dead_saves(base: Path) -> None:
    """Remove the private directories of runs killed while saving a snapshot (their pid is in the name)."""
    for stale in base.glob(".*.tmp"):
        try:
            pid = int(stale.name.split(".")[2])
        except (IndexError, ValueError):
            pid = -1
        if pid <= 0 or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def prune(root: Path | None = None, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> list[str]:
    """Keep the most recently used snapshots within ``max_bytes`` allocated and ``keep`` in number; remove the
    rest, and private directories of runs that died while saving. Returns the keys removed."""
    base = snapshots_dir(root)
    if not base.is_dir():
        return []
    removed = []
    drop_dead_saves(base)
    total = 0
    dirs = sorted((d for d in base.glob("*") if d.is_dir() and not d.name.startswith(".")), key=mtime_or_zero,
                  reverse=True)
    for i, d in enumerate(dirs):
        size = allocated(d)
        if i >= keep or (i > 0 and total + size > max_bytes):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        else:
            total += size
    return removed


def remove_snapshots(root: Path | None = None) -> int:
    base = snapshots_dir(root)
    n = 0
    for d in base.glob("*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            n += not d.name.startswith(".")
    return n
