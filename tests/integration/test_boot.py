"""Real boots under QEMU (TCG here): the default scenario, and every way a run can go wrong.

One default boot is shared by the assertions that only read its result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import aperture_argv, interruptible, qemu_processes, run_aperture


def test_json_contract(default_run) -> None:
    _, result, run_dir = default_run
    for key in ("ok", "accel", "qemu_version", "kernel_release", "boot_s", "run_dir", "checks"):
        assert key in result
    assert result["ok"] is True
    assert result["accel"] in ("tcg", "kvm")
    assert 0 < result["boot_s"] < 60
    assert Path(result["run_dir"]) == run_dir.resolve()
    for check in result["checks"]:
        assert set(check) >= {"name", "ok", "detail"}


def test_json_matches_the_published_schema(default_run) -> None:
    import json

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "run-schema.json").read_text())
    jsonschema.validate(default_run[1], schema)
    broken = dict(default_run[1], accel="xen")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_junit_xml(tmp_path: Path) -> None:
    import shutil
    import xml.etree.ElementTree as ET

    out = tmp_path / "aperture.xml"
    run_dir = tmp_path / "a,share=off"  # a comma in a path reaches QEMU doubled, never as an option
    bins = tmp_path / "b,in"
    bins.mkdir()
    shutil.copy("/usr/bin/stat", bins / "stat")  # and a comma in a --guest-bin path is only a file name
    proc = run_aperture("run", "-q", "--device", "none", "--junit-xml", str(out), "--run-dir",
                        str(run_dir), "--guest-bin", str(bins / "stat"), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "pmem0.img").stat().st_blocks > 0  # share=on held: guest writes reached the file
    suite = ET.parse(out).getroot()
    names = {c.get("name") for c in suite.iter("testcase")}
    assert {"nvdimm.present", "dax.fsdax", "zone_device.probe"} <= names
    assert suite.get("failures") == "0" and int(suite.get("tests")) == len(names)


def test_nvdimm_present_matches_qmp(default_run) -> None:
    _, result, _ = default_run
    check = next(c for c in result["checks"] if c["name"] == "nvdimm.present")
    assert check["ok"]
    regions = sorted((r["addr"], r["size"]) for r in check["detail"]["regions"])
    assert regions == sorted((q["addr"], q["size"]) for q in check["detail"]["qmp"])
    assert len(regions) == 2
    region = {"addr": regions[0][0], "size": regions[0][1]}
    assert region["size"] == 256 << 20
    assert region["addr"] >= 1 << 32  # device memory above 4 GiB on q35


def test_run_leaves_nothing_behind(default_run) -> None:
    _, result, run_dir = default_run
    assert not qemu_processes(str(run_dir))
    assert not list(run_dir.glob("*.sock"))
    name = result["run_name"]
    assert not [p for p in os.listdir("/dev/shm") if name in p]
    assert not (Path(tempfile.gettempdir()) / f"aperture-{os.getuid()}" / name).exists()
    assert (run_dir / "results.jsonl").stat().st_size > 0  # console.log is empty after a restore: no boot
    assert (run_dir / "pmem0.img").stat().st_size == 256 * 2**20  # label-less NVDIMM: the file is the data


def test_human_summary(tmp_path: Path) -> None:
    proc = run_aperture("run", "--cold", "--append", "aperture_scenario=nvdimm", "--run-dir", str(tmp_path / "r"),
                        timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and "nvdimm.present" in proc.stdout and "matches QMP" in proc.stdout
    assert "guest up" in proc.stderr  # progress while booting


def test_kernel_panic_is_exit_4(tmp_path: Path) -> None:
    proc = run_aperture("run", "--append", "rdinit=/nonexistent", "--run-dir", str(tmp_path / "r"), timeout=240)
    assert proc.returncode == 4
    assert "kernel panicked" in proc.stderr and "Traceback" not in proc.stderr
    assert not qemu_processes(str(tmp_path))


def test_hung_guest_times_out_with_exit_4(tmp_path: Path) -> None:
    proc = run_aperture("run", "--append", "aperture_scenario=hang", "--timeout", "12",
                        "--run-dir", str(tmp_path / "r"), timeout=240)
    assert proc.returncode == 4
    assert "timed out" in proc.stderr and "Traceback" not in proc.stderr
    assert not qemu_processes(str(tmp_path))


def test_qemu_that_dies_is_exit_4(tmp_path: Path) -> None:
    wrapper = tmp_path / "qemu"
    wrapper.write_text("#!/bin/sh\nexec qemu-system-x86_64 \"$@\" -device no-such-device\n")
    wrapper.chmod(0o755)
    proc = run_aperture("run", "--accel", "tcg", "--run-dir", str(tmp_path / "r"),
                        env={"APERTURE_QEMU": str(wrapper)}, timeout=120)
    assert proc.returncode == 4
    assert "QEMU failed to start" in proc.stderr and "no-such-device" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 5  # progress (image, accelerator, snapshot), one error line


def test_qemu_killed_mid_boot_is_exit_4(tmp_path: Path) -> None:
    wrapper = tmp_path / "qemu"
    wrapper.write_text("#!/bin/sh\nqemu-system-x86_64 \"$@\" & pid=$!\nsleep 2\nkill -9 $pid\nwait $pid\n")
    wrapper.chmod(0o755)
    proc = run_aperture("run", "--accel", "tcg", "--run-dir", str(tmp_path / "r"),
                        env={"APERTURE_QEMU": str(wrapper)}, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "QEMU died" in proc.stderr and "Traceback" not in proc.stderr
    assert not qemu_processes(str(tmp_path))


def test_ctrl_c_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(aperture_argv() + ["run", "--run-dir", str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 60
    while not qemu_processes(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_processes(str(run_dir)), "QEMU never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not qemu_processes(str(run_dir))
    name = next(line.split()[2] for line in err.splitlines() if line.startswith(("» booting", "» restored")))
    assert not [p for p in os.listdir("/dev/shm") if name in p]
    assert not (Path(tempfile.gettempdir()) / f"aperture-{os.getuid()}" / name).exists()


def test_mismatched_modules_are_exit_3(tmp_path: Path, debian_kernel) -> None:
    import lzma

    mods = tmp_path / "mods"
    (mods / "kernel").mkdir(parents=True)
    for src in debian_kernel.modules_dir.rglob("*.ko.xz"):
        if src.name in ("libnvdimm.ko.xz", "nfit.ko.xz"):
            raw = lzma.decompress(src.read_bytes())
            old = debian_kernel.release.encode()
            raw = raw.replace(b"vermagic=" + old, b"vermagic=" + old[:-1] + b"Z")
            (mods / "kernel" / src.name.removesuffix(".xz")).write_bytes(raw)
    proc = run_aperture("run", "--kernel", str(debian_kernel.image), "--modules", str(mods), timeout=120)
    assert proc.returncode == 3
    assert "modules do not match" in proc.stderr and "Traceback" not in proc.stderr


def test_pvh_vmlinux_boots(tmp_path: Path, debian_kernel) -> None:
    """--kernel takes an ELF vmlinux with a PVH note (extracted from the Debian bzImage here)."""
    from aperture.guest.pvh import extract_pvh_vmlinux

    vmlinux, why = extract_pvh_vmlinux(debian_kernel)
    if vmlinux is None:
        pytest.skip(why)
    proc = run_aperture("run", "--json", "-q", "--kernel", str(vmlinux), "--device", "none",
                        "--pmem", "64M:devdax", "--run-dir", str(tmp_path / "r"), timeout=240)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["kernel_release"] == debian_kernel.release
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == {"nvdimm.present", "dax.devdax", "zone_device.p2pmem", "p2p.nvme_cmb", "witness.hmm_tests",
                           "guest.dmesg"}
    for name in ("zone_device.p2pmem", "p2p.nvme_cmb", "witness.hmm_tests"):  # Debian's kernel cannot have them
        assert checks[name]["ok"] and checks[name]["detail"]["skip_reason"], checks[name]
    assert any("zone_device.probe not run" in m for m in result["messages"])  # needs an fsdax NVDIMM
