"""QEMU command line and result verification, without QEMU."""

import json
from pathlib import Path

import pytest

from emulator.config import KernelSpec, PmemConfig, VmConfig
from emulator.errors import ConfigError
from emulator.machine import RunPaths, build_argv, kernel_cmdline
from emulator.results import Check, HostVerifier, verify_nvdimm
from qmp_client.session import MemoryDevice


def _argv(config: VmConfig, accel: str = "tcg") -> list[str]:
    paths = RunPaths(Path("/r"), "t1", Path("/dev/shm"), Path("/tmp/aperture-0/t1"))
    kernel = KernelSpec(Path("/k/vmlinuz"), Path("/k/mods"), "6.1")
    return build_argv("qemu", config, kernel, Path("/i.cpio"), paths, accel, kernel_cmdline(config, "default"))


def _opt_values(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


def test_default_argv_shape() -> None:
    argv = _argv(VmConfig())
    joined = " ".join(argv)
    assert "q35,nvdimm=on,memory-backend=ram0" in joined
    assert "-nic none" in joined and "-vga none" in joined and "-no-reboot" in argv
    objects = _opt_values(argv, "-object")
    assert any("id=ram0" in o and "share=on" in o and "/dev/shm/aperture-t1-ram" in o for o in objects)
    assert any("id=pmem0" in o and f"size={256 * 2**20 + 128 * 1024}" in o and "share=on" in o for o in objects)
    assert "nvdimm,id=nvdimm0,memdev=pmem0,label-size=131072" in _opt_values(argv, "-device")
    assert "panic=-1" in _opt_values(argv, "-append")[0]
    assert _opt_values(argv, "-cpu") == ["max"]


def test_default_topology_is_fsdax_plus_devdax_and_a_probe_bar() -> None:
    argv = _argv(VmConfig())
    assert "aperture_pmem_modes=fsdax,devdax" in _opt_values(argv, "-append")[0]
    assert "ivshmem-plain,id=probe-bar,memdev=probebar,addr=0xf" in _opt_values(argv, "-device")
    devices = _opt_values(argv, "-device")
    assert "ivshmem-doorbell,id=aperture0-ctl,chardev=apctl0,vectors=1,addr=0x10" in devices
    assert "ivshmem-plain,id=aperture1-win,memdev=apwin1,addr=0x13" in devices
    assert "socket,id=apctl1,path=/tmp/aperture-0/t1/aperture1.sock" in _opt_values(argv, "-chardev")
    assert "aperture_devices=2" in _opt_values(argv, "-append")[0]
    assert any("id=probebar" in o and "size=2097152" in o for o in _opt_values(argv, "-object"))


def test_two_pmem_and_kvm() -> None:
    argv = _argv(VmConfig(pmem=(PmemConfig(), PmemConfig.parse("64M:devdax"), PmemConfig())), accel="kvm")
    assert _opt_values(argv, "-cpu") == ["host"]
    assert sum(1 for d in _opt_values(argv, "-device") if d.startswith("nvdimm,")) == 3
    assert "slots=3" in _opt_values(argv, "-m")[0]
    assert "aperture_pmem=3" in _opt_values(argv, "-append")[0]
    assert "aperture_pmem_modes=raw,devdax,raw" in _opt_values(argv, "-append")[0]


def test_verify_nvdimm() -> None:
    devs = [MemoryDevice("nvdimm", "nvdimm0", 0x100000000, 256 << 20, "/objects/pmem0")]
    good = Check("nvdimm.present", True, {"regions": [{"name": "region0", "addr": 0x100000000, "size": 256 << 20}]})
    assert verify_nvdimm(good, devs).ok
    moved = Check("nvdimm.present", True, {"regions": [{"name": "region0", "addr": 0x200000000, "size": 256 << 20}]})
    assert not verify_nvdimm(moved, devs).ok
    assert not verify_nvdimm(Check("nvdimm.present", True, "garbage"), devs).ok
    assert not verify_nvdimm(good, []).ok


def _stamped_nvdimm(tmp_path: Path) -> tuple[HostVerifier, dict]:
    """One fsdax NVDIMM at 4 GiB whose backing file holds the guest's stamp at +1 MiB."""
    pmem = tmp_path / "pmem0.img"
    unit = "aperture:t:fsdax\n"
    with open(pmem, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write((unit * 300).encode()[:4096])
    verifier = HostVerifier([MemoryDevice("nvdimm", "nvdimm0", 1 << 32, 4 << 20, "/objects/pmem0")], [], [pmem],
                            ["fsdax"], {}, 512 << 20, "probe")
    detail = {"device": "/dev/pmem1", "stamp_phys": (1 << 32) + (1 << 20), "stamp_len": 4096, "stamp": unit}
    return verifier, detail


def test_ndctl_witness_agrees_disagrees_or_is_absent(tmp_path: Path) -> None:
    verifier, detail = _stamped_nvdimm(tmp_path)
    listing = [{"dev": "namespace1.0", "mode": "fsdax", "blockdev": "pmem1"},
               {"dev": "namespace0.0", "mode": "devdax", "chardev": "dax0.0"}]
    agrees = verifier.verify(Check("dax.fsdax", True, dict(detail, ndctl=json.dumps(listing))))
    assert agrees.ok and agrees.detail["host_verified"]
    assert agrees.detail["ndctl_witness"] == {"present": True, "device": "pmem1", "expected_mode": "fsdax",
                                              "ok": True, "namespace": "namespace1.0", "mode": "fsdax"}
    assert "ndctl" not in agrees.detail  # the raw listing is replaced by the parsed witness
    lone = verifier.verify(Check("dax.fsdax", True, dict(detail, ndctl=json.dumps(listing[0]))))
    assert lone.ok  # ndctl prints a single namespace as a bare object
    wrong = [dict(listing[0], mode="raw")]
    disagrees = verifier.verify(Check("dax.fsdax", True, dict(detail, ndctl=json.dumps(wrong))))
    assert not disagrees.ok and "mode raw" in disagrees.detail["ndctl_witness"]["why"]
    for bad in ("error: ndctl list failed", json.dumps([listing[1]])):
        assert not verifier.verify(Check("dax.fsdax", True, dict(detail, ndctl=bad))).ok
    absent = verifier.verify(Check("dax.fsdax", True, detail))
    assert absent.ok and absent.detail["ndctl_witness"]["present"] is False


def test_old_auto_named_run_dirs_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run dir holds ~0.5 GB: the newest auto-named ones stay, named and live ones are never touched."""
    import os
    import subprocess

    from emulator.machine import new_run_name
    from emulator.run import AUTO_RUN_NAME, default_run_dir

    child = subprocess.Popen(["true"])  # its pid names runs whose process has exited
    child.wait()
    old_dead = [tmp_path / f"2026010{i}-120000-{child.pid}-abc{i}" for i in range(1, 5)]
    live = tmp_path / f"20250101-120000-{os.getpid()}-beef"  # oldest, but its process runs
    named = tmp_path / "dev"
    for age, path in enumerate([live, named, *old_dead]):
        path.mkdir()
        (path / "devmem0.img").write_bytes(b"x")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    assert AUTO_RUN_NAME.fullmatch(new_run_name())
    monkeypatch.setenv("APERTURE_RUNS", str(tmp_path))
    monkeypatch.setenv("APERTURE_KEEP_RUNS", "2")
    assert default_run_dir("next") == tmp_path / "next"
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {live.name, named.name, old_dead[3].name, old_dead[2].name}  # the two newest dead ones stay
    monkeypatch.setenv("APERTURE_KEEP_RUNS", "lots")
    with pytest.raises(ConfigError):
        default_run_dir("next")
