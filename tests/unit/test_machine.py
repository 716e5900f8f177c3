"""QEMU command line and result verification, without QEMU."""

from pathlib import Path

import pytest

from emulator.config import KernelSpec, PmemConfig, VmConfig
from emulator.errors import ConfigError
from emulator.machine import RunPaths, build_argv, kernel_cmdline
from emulator.results import Check, verify_nvdimm
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
