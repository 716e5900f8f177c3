"""Warm start: a snapshot of the ready VM, restored by run, up and the pytest fixture. Same results either way,
each restore with files of its own, a bad snapshot a note and a cold boot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import aperture_argv, checks_by_name, run_aperture


def test_a_second_run_restores_and_every_check_passes(default_run, tmp_path: Path) -> None:
    """default_run restored (or, with no snapshot yet, booted and saved one); this run restores it: the same
    checks, all ok either way."""
    _, first, _ = default_run
    assert first["start"] == "restore" or first["snapshot_made_s"] > 0
    proc = run_aperture("run", "--json", "--run-dir", str(tmp_path / "r"), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-3000:]
    second = json.loads(proc.stdout)
    assert second["start"] == "restore" and second["snapshot"] == first["snapshot"]
    assert 0 < second["restore_s"] < second["boot_s"]
    assert set(checks_by_name(second)) == set(checks_by_name(first))
    assert all(c["ok"] for c in second["checks"])


def test_cold_boots_and_says_so(tmp_path: Path) -> None:
    proc = run_aperture("run", "--cold", "--json", "--run-dir", str(tmp_path / "r"), "--", "true", timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["start"] == "cold" and result["restore_s"] is None
    assert any("--cold" in m for m in result["messages"])


def _writer(run_dir: Path, token: str) -> subprocess.Popen[str]:
    """One run that writes its token into device memory (a window page, written back on unmap) and into the
    fsdax NVDIMM's block device."""
    script = (f"aperture-helper map 0 0 5 && aperture-helper poke 0 0 0 {token.encode().hex()} && "
              f"aperture-helper unmap 0 0 && pmem=$(ls /dev/pmem[0-9]* | head -n 1) && [ -b \"$pmem\" ] && "
              f"printf {token} | dd of=$pmem bs=4096 seek=16384 conv=notrunc,fsync")
    return subprocess.Popen(aperture_argv() + ["run", "--json", "--run-dir", str(run_dir),
                             "--", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_restores_at_once_never_share_a_file(default_run, tmp_path: Path) -> None:
    tokens = {"a": "warm-start-token-AAAA", "b": "warm-start-token-BBBB"}
    procs = {k: _writer(tmp_path / k, t) for k, t in tokens.items()}
    for proc in procs.values():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert json.loads(out)["start"] == "restore"
    slot = 2 << 20
    for k, token in tokens.items():
        other = tokens["b" if k == "a" else "a"]
        devmem = (tmp_path / k / "devmem0.img").read_bytes()[5 * slot: 5 * slot + len(token)]
        assert devmem == token.encode()
        pmem = b"".join(p.read_bytes() for p in sorted((tmp_path / k).glob("pmem*.img")))
        assert token.encode() in pmem and other.encode() not in pmem
        assert not (tmp_path / k / "devmem0.img").samefile(tmp_path / ("b" if k == "a" else "a") / "devmem0.img")


@pytest.mark.parametrize("where", ["start", "middle"])
def test_a_corrupt_snapshot_is_a_note_and_a_cold_boot(default_run, tmp_path: Path, where: str) -> None:
    """A copy of the real snapshot with bytes changed — 16 at its start, or 1 MiB of random bytes in the middle of
    its data: detected before use, removed, booted cold (a silently different guest is worse than a cold boot)."""
    from aperture.emulator.vm.snapshots import snapshots_dir

    key = default_run[1]["snapshot"]
    copy = tmp_path / "snaps"
    shutil.copytree(snapshots_dir() / key, copy / key)
    state = copy / key / "state.mig"
    with open(state, "r+b") as f:
        if where == "start":
            f.seek(100)
            f.write(b"\xde\xad\xbe\xef" * 4)
        else:
            fd = f.fileno()
            middle = os.lseek(fd, state.stat().st_size // 2, os.SEEK_DATA)  # the first data at or after it
            f.seek(middle)
            f.write(os.urandom(1 << 20))
    env = dict(os.environ, APERTURE_SNAPSHOTS=str(copy))
    proc = run_aperture("run", "--json", "--run-dir", str(tmp_path / "r"), "--", "true", timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["start"] == "cold"
    assert any("fails its checksum" in m for m in result["messages"]), result["messages"]
    assert not (copy / key).exists()  # removed: the next run makes a new one


def test_snapshot_ls_lists_the_snapshot(default_run) -> None:
    proc = run_aperture("snapshot", "ls", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    snaps = {s["key"]: s for s in json.loads(proc.stdout)["snapshots"]}
    snap = snaps[default_run[1]["snapshot"]]
    assert snap["ok"] and snap["allocated_bytes"] > 0 and snap["accel"] == default_run[1]["accel"]
