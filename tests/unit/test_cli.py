"""CLI edge: bad input → one line on stderr, exit 2/3, no traceback (no VM is booted)."""

import pytest

from tests.conftest import run_aperture


@pytest.mark.parametrize("args,code,text", [
    (["run", "--pmem", "7M"], 2, "too small"),
    (["run", "--pmem", "257M"], 2, "multiple of 2M"),
    (["run", "--memory", "12Q"], 2, "invalid size"),
    (["run", "--accel", "xen"], 2, "--accel"),
    (["run", "--kernel", "/does/not/exist"], 2, "/does/not/exist: no such file"),
    (["run", "--kernel", "/tmp"], 2, "is not a kernel build tree"),
    (["run", "--nvme", "3M"], 2, "16M to 16G"),
    (["run", "--kernel", "built", "--modules", "/tmp"], 2, "--kernel: a modules directory and a config go with"),
    (["run", "--run-dir", "/etc/hostname"], 2, "exists and is not a directory"),
    (["run", "--device", "aperture,mem=256M,window=512M"], 2, "window 512M is larger than device memory 256M"),
    (["run", "--timeout", "-3"], 2, "--timeout"),
    (["frobnicate"], 2, "No such command"),
])
def test_bad_input_exit_codes(args: list[str], code: int, text: str) -> None:
    proc = run_aperture(*args, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_qemu_is_exit_3() -> None:
    proc = run_aperture("run", env={"APERTURE_QEMU": "/nonexistent/qemu"}, timeout=60)
    assert proc.returncode == 3
    assert "qemu-system-x86_64 not found" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_kernel_cache_is_exit_3(tmp_path) -> None:
    proc = run_aperture("run", env={"APERTURE_CACHE": str(tmp_path)}, timeout=60)
    assert proc.returncode == 3
    assert "no built guest kernel" in proc.stderr and "aperture kernel build" in proc.stderr


def test_help_lists_commands() -> None:
    proc = run_aperture("--help")
    assert proc.returncode == 0
    for cmd in ("run", "image", "doctor", "bench", "fetch", "kernel"):
        assert cmd in proc.stdout


def test_doctor_json() -> None:
    import json

    proc = run_aperture("doctor", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"qemu", "guest binaries", "cache", "accelerator", "kernel: built", "kernel: debian",
                           "snapshots"}
    assert report["snapshots"]["count"] >= report["snapshots"]["usable"] >= 0
    assert report["guest binaries"]["mke2fs"].endswith("/mke2fs")
    assert report["qemu"]["version"].count(".") == 2
    built, debian = report["kernel: built"]["config flags"], report["kernel: debian"]["config flags"]
    assert built["PCI_P2PDMA"] == built["DEVICE_PRIVATE"] == built["ZONE_DEVICE"] == "y"
    assert built["TEST_HMM"] == "m"
    assert debian["ZONE_DEVICE"] == "y" and debian["PCI_P2PDMA"] in ("n", "not set")


def test_bisect_maps_a_kernel_that_cannot_be_tested_to_125() -> None:
    proc = run_aperture("run", "--bisect", "--kernel", "/does/not/exist", timeout=60)
    assert proc.returncode == 125, proc.stderr
    assert "cannot test this commit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
