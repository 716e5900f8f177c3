"""QEMU command line and result verification, without QEMU."""

import json
from pathlib import Path

import pytest
from aperture.emulator.config import PmemConfig, VmConfig
from aperture.emulator.runpaths import RunPaths
from aperture.emulator.runs.results import Check, HostVerifier, verify_nvdimm
from aperture.emulator.vm.qemu_argv import build_argv, kernel_cmdline
from aperture.guest.errors import ConfigError
from aperture.guest.kernelspec import KernelSpec
from aperture.qmp_client.session import MemoryDevice


def _argv(config: VmConfig, accel: str = "tcg", plug_nvme: bool = True) -> list[str]:
    paths = RunPaths(Path("/r"), "t1", Path("/dev/shm"), Path("/tmp/aperture-0/t1"))
    kernel = KernelSpec(Path("/k/vmlinuz"), Path("/k/mods"), "6.1")
    return build_argv("qemu", config, kernel, Path("/i.cpio"), paths, accel, kernel_cmdline(config, "default"),
                      plug_nvme=plug_nvme)


def _opt_values(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


def test_default_argv_shape() -> None:
    argv = _argv(VmConfig())
    joined = " ".join(argv)
    assert "q35,nvdimm=on,memory-backend=ram0" in joined
    assert "-nic none" in joined and "-vga none" in joined and "-no-reboot" in argv
    objects = _opt_values(argv, "-object")
    assert any("id=ram0" in o and "share=on" in o and "/dev/shm/aperture-t1-ram" in o for o in objects)
    assert any("id=pmem0" in o and f"size={256 * 2**20}" in o and "share=on" in o for o in objects)
    assert "nvdimm,id=nvdimm0,memdev=pmem0" in _opt_values(argv, "-device")  # label-less: no label-size
    assert "panic=-1" in _opt_values(argv, "-append")[0]
    assert _opt_values(argv, "-cpu") == ["max,family=23,model=1"]  # Zen: P2PDMA through the host bridge


def test_default_topology_is_fsdax_plus_devdax_and_a_probe_bar() -> None:
    argv = _argv(VmConfig())
    assert "aperture_pmem_modes=fsdax,devdax" in _opt_values(argv, "-append")[0]
    assert "ivshmem-plain,id=probe-bar,memdev=probebar,master=on,addr=0xf" in _opt_values(argv, "-device")
    devices = _opt_values(argv, "-device")
    assert "ivshmem-doorbell,id=aperture0-ctl,chardev=apctl0,vectors=1,master=on,addr=0x10" in devices
    assert "ivshmem-plain,id=aperture1-win,memdev=apwin1,master=on,addr=0x13" in devices
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

    from aperture.emulator.runpaths import new_run_name
    from aperture.emulator.runs.run import AUTO_NAME, default_run_dir

    child = subprocess.Popen(["true"])  # its pid names runs whose process has exited
    child.wait()
    old_dead = [tmp_path / f"2026010{i}-120000-{child.pid}-abc{i}" for i in range(1, 5)]
    live = tmp_path / f"20250101-120000-{os.getpid()}-beef"  # oldest, but its process runs
    named = tmp_path / "dev"
    for age, path in enumerate([live, named, *old_dead]):
        path.mkdir()
        (path / "devmem0.img").write_bytes(b"x")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    assert AUTO_NAME.fullmatch(new_run_name())
    monkeypatch.setenv("APERTURE_RUNS", str(tmp_path))
    monkeypatch.setenv("APERTURE_KEEP_RUNS", "2")
    assert default_run_dir("next") == tmp_path / "next"
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {live.name, named.name, old_dead[3].name, old_dead[2].name}  # the two newest dead ones stay
    monkeypatch.setenv("APERTURE_KEEP_RUNS", "lots")
    with pytest.raises(ConfigError):
        default_run_dir("next")


def test_default_topology_has_an_nvme_with_a_cmb() -> None:
    argv = _argv(VmConfig())
    nvme = [d for d in _opt_values(argv, "-device") if d.startswith("nvme,")]
    assert nvme == ["nvme,id=nvme0,serial=aperture0,drive=nvme0drive,cmb_size_mb=16,bus=nvme0port"]
    port = "pcie-root-port,id=nvme0port,chassis=16,slot=16,pref64-reserve=32M,addr=0xe"
    assert port in _opt_values(argv, "-device")
    without = _argv(VmConfig(), plug_nvme=False)  # a snapshot's topology: the port is there, empty
    assert port in _opt_values(without, "-device")
    assert not [d for d in _opt_values(without, "-device") if d.startswith("nvme,")]
    assert any("file=/r/nvme0.img" in d and "format=raw" in d for d in _opt_values(argv, "-drive"))
    assert not [d for d in _opt_values(_argv(VmConfig(nvme=0)), "-device") if d.startswith("nvme,")]


def test_results_channel_survives_hostile_lines(tmp_path: Path) -> None:
    """Deep nesting, an over-long line and non-objects become garbage notes; the channel goes on."""
    from aperture.emulator.vm.channels import RESULTS_LINE_MAX
    from aperture.emulator.vm.machine import Vm, VmBoot

    vm = Vm(VmConfig(devices=()), VmBoot(KernelSpec(Path("/k"), None, "6.1"), Path("/i")), run_dir=tmp_path)
    vm.paths.run_dir.mkdir(parents=True, exist_ok=True)
    with open(vm.paths.results, "wb") as f:
        f.write(b'{"type":"hello"}\n')
        f.write(b"[" * 100_000 + b"]\n")
        f.write(b"x" * (3 * RESULTS_LINE_MAX) + b"\n")
        f.write(b"[1, 2]\n")
        f.write(b'{"type":"check","name":"a.b","ok":true}\n')
        f.write(b'{"type":"done"}\n')
    msgs = list(vm.messages(run_timeout=30))
    kinds = [m["type"] for m in msgs]
    assert kinds == ["hello", "garbage", "garbage", "garbage", "check", "done"]
    assert "nested deeper" in msgs[1]["why"] and "longer than" in msgs[2]["why"]


def test_files_of_killed_runs_are_reaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed with -9 leaves shm files and a socket dir (its QEMU died with it): the next run removes them,
    never those of a live process."""
    import os
    import subprocess

    from aperture.emulator import runpaths

    monkeypatch.setattr(runpaths, "default_sock_dir", lambda name: tmp_path / "sock" / name)
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_name, live_name = f"20260101-000000-{dead.pid}-abcd", f"20260101-000000-{os.getppid()}-abcd"
    shm = tmp_path / "shm"
    shm.mkdir()
    for name in (dead_name, live_name):
        (shm / f"aperture-{name}-ram").write_bytes(b"x")
        (tmp_path / "sock" / name).mkdir(parents=True)
    (shm / "aperture-pytest-1234-ram").write_bytes(b"x")  # not an auto name: never touched
    assert runpaths.reap_dead_runs(shm) == [dead_name]
    assert sorted(p.name for p in shm.iterdir()) == sorted(["aperture-pytest-1234-ram", f"aperture-{live_name}-ram"])
    assert [p.name for p in (tmp_path / "sock").iterdir()] == [live_name]


def test_a_comma_in_a_path_never_reaches_qemu_unquoted() -> None:
    """QEMU reads ``,,`` as a comma inside a value: a run dir named ``a,share=off`` cannot add an option."""
    paths = RunPaths(Path("/tmp/runs/a,share=off"), "t1", Path("/dev/shm"), Path("/tmp/aperture-0/t,1"))
    kernel = KernelSpec(Path("/k/vmlinuz"), None, "6.1")
    argv = build_argv("qemu", VmConfig(), kernel, Path("/i.cpio"), paths, "tcg", kernel_cmdline(VmConfig(), "default"))
    objects = _opt_values(argv, "-object")
    assert any("mem-path=/tmp/runs/a,,share=off/pmem0.img,share=on" in o for o in objects)
    assert not any("a,share=off" in o for o in objects + _opt_values(argv, "-chardev") + _opt_values(argv, "-drive"))
    assert any("path=/tmp/aperture-0/t,,1/aperture0.sock" in c for c in _opt_values(argv, "-chardev"))


def test_exec_output_lost_on_the_channel_is_an_error_not_silence(tmp_path: Path) -> None:
    """A cmd-output chunk glued to an over-long garbage line is dropped with it: exec says so."""
    from aperture.emulator.vm.channels import RESULTS_LINE_MAX
    from aperture.emulator.vm.machine import Vm, VmBoot
    from aperture.guest.errors import GuestError

    vm = Vm(VmConfig(devices=()), VmBoot(KernelSpec(Path("/k"), None, "6.1"), Path("/i")), run_dir=tmp_path)
    vm.paths.run_dir.mkdir(parents=True, exist_ok=True)

    class Sink:
        def sendall(self, data: bytes) -> None:
            with open(vm.paths.results, "ab") as f:
                f.write(b"x" * (RESULTS_LINE_MAX + 10))  # garbage without a newline ...
                f.write(b'{"type":"cmd-output","id":1,"data":"still-here\\n"}\n')  # ... swallows this chunk
                f.write(b'{"type":"cmd-done","id":1,"rc":0,"output_bytes":11,"truncated":false}\n')

    vm._cmd_sock = Sink()  # type: ignore[assignment]
    with pytest.raises(GuestError, match="lost on the results channel: 0 of 11 bytes"):
        vm.exec("echo still-here", timeout=10)


def test_a_full_run_dir_is_refused_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """48 MiB free where the VM's sparse files could grow by ~1 GiB: a SetupError (exit 3) naming the path."""
    import os

    from aperture.emulator.vm.machine import Vm, VmBoot
    from aperture.guest.errors import SetupError

    real = os.statvfs
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    class Small:
        f_bavail, f_frsize = 48 * 1024 * 1024 // 4096, 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Small() if Path(p) == run_dir.resolve() else real(p))
    vm = Vm(VmConfig(), VmBoot(KernelSpec(Path("/k"), None, "6.1"), Path("/i")), run_dir=run_dir)
    with pytest.raises(SetupError, match=rf"{run_dir.resolve()} has 48M free, but this VM's files there can grow"):
        vm.check_space()
    assert sum(vm.backing_files().values()) > 1 << 30
    monkeypatch.setattr(os, "statvfs", real)
    vm.check_space()  # the real filesystem has room


def test_a_flood_on_the_results_channel_stops_the_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aperture.emulator.vm import channels, machine
    from aperture.guest.errors import GuestError

    monkeypatch.setattr(channels, "RESULTS_TOTAL_MAX", 1 << 20)
    vm = machine.Vm(VmConfig(devices=()), machine.VmBoot(KernelSpec(Path("/k"), None, "6.1"), Path("/i")),
                    run_dir=tmp_path)
    vm.paths.run_dir.mkdir(parents=True, exist_ok=True)
    with open(vm.paths.results, "wb") as f:
        f.write(b'{"type":"log","message":"spam"}\n' * 40_000)
    with pytest.raises(GuestError, match="more than 1 MiB on the results channel"):
        list(vm.messages(run_timeout=30))


def test_qmp_sessions_do_not_hoard_events() -> None:
    """Every remap makes a STOP and a RESUME event: the default all-events queue of qemu.qmp must not keep them."""
    from aperture.qmp_client.session import QmpSession
    from qemu.qmp import Message

    session = QmpSession("t")
    assert not session._client.events.accept(Message({"event": "STOP", "data": {}, "timestamp": {}}))


def test_a_helper_with_another_results_abi_is_refused() -> None:
    from aperture.emulator.runs.run import check_helper_abi
    from aperture.guest import abi
    from aperture.guest.errors import SetupError

    check_helper_abi({"type": "hello", "helper_abi": abi.HELPER_ABI})
    for other in (abi.HELPER_ABI + 1, None, "1"):
        with pytest.raises(SetupError, match=f"speaks results ABI {other!r}, this host {abi.HELPER_ABI}") as err:
            check_helper_abi({"type": "hello", "helper_abi": other})
        assert err.value.exit_code == 3


def test_verbatim_qemu_arguments_refuse_what_cannot_survive() -> None:
    """-kernel/-initrd/-append take no quoting; a newline or NUL in them is refused, not passed on."""
    paths = RunPaths(Path("/r"), "t", Path("/dev/shm"), Path("/s"))
    for kernel, initrd in ((Path("/k\nx"), Path("/i")), (Path("/k"), Path("/i\0x"))):
        with pytest.raises(ConfigError, match="cannot hold a newline or NUL"):
            build_argv("qemu", VmConfig(), KernelSpec(kernel, None, "6.1"), initrd, paths, "tcg", "quiet")


def test_exec_output_keeps_its_first_and_last_mib_only() -> None:
    """A guest can put any amount into its own command's output: the host keeps the first and the last
    EXEC_KEPT_BYTES, and says how much it dropped between them."""
    from aperture.emulator.vm.machine import BoundedOutput

    out = BoundedOutput(1000)
    for i in range(5000):  # 5000 chunks of 13 bytes: 65 000 bytes
        out.add(f"line {i:07d}\n".encode())
    assert len(out.head) == 1000 and len(out.tail) == 1000 and out.dropped == 65_000 - 2000
    text = out.text()
    assert text.startswith("line 0000000\n") and text.endswith("line 0004999\n")
    assert f"[aperture: {65_000 - 2000} bytes of output dropped here]" in text
    small = BoundedOutput(1000)
    small.add(b"short")
    assert small.text() == "short" and small.dropped == 0


def test_one_builder_per_snapshot(tmp_path: Path) -> None:
    from aperture.emulator.vm.snapshots import SnapshotKey, builder_lock

    key = SnapshotKey("k" * 20, {})
    with builder_lock(key, root=tmp_path) as first:
        assert first
        with builder_lock(key, wait_s=0.3, root=tmp_path) as second:
            assert not second  # another is making it: look again or boot cold
    with builder_lock(key, root=tmp_path) as again:
        assert again


def test_the_data_crc_sees_a_change_anywhere_in_the_data(tmp_path: Path) -> None:
    import os

    from aperture.emulator.vm.snapshots import data_crc32

    state = tmp_path / "state.mig"
    with open(state, "wb") as f:  # sparse: data, a 64 MiB hole, data
        f.write(os.urandom(1 << 20))
        f.seek(65 << 20)
        f.write(os.urandom(1 << 20))
    before = data_crc32(state)
    with open(state, "r+b") as f:
        f.seek((65 << 20) + 12345)
        old = f.read(1)[0]
        f.seek((65 << 20) + 12345)
        f.write(bytes([old ^ 0xFF]))  # one byte, surely changed
    assert data_crc32(state) != before
