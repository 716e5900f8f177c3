"""The guest kernel built for the job (the default), Debian's prebuilt kernel, and a user's monolithic one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aperture.guest.errors import SetupError

from tests.conftest import checks_by_name, run_aperture


def test_built_kernel_is_the_default(default_run, built_kernel) -> None:
    _, result, _ = default_run
    assert result["kernel_release"] == built_kernel.release
    assert built_kernel.kind == "built" and built_kernel.image.name == "vmlinux"  # booted through its PVH entry


def test_p2pmem_row_is_the_nvme_cmb_checked_against_qmp(default_run) -> None:
    check = checks_by_name(default_run[1])["zone_device.p2pmem"]
    assert check["ok"], check
    d = check["detail"]
    assert d["result"] == "ok" and d["source"].startswith("/dev/nvme") and d["phys_ok"] is True
    assert d["qmp_nvme_bar"] is not None and d["p2pmem_size"] == 16 << 20


def test_nvme_cmb_round_trip_is_in_the_namespace_file(default_run) -> None:
    check = checks_by_name(default_run[1])["p2p.nvme_cmb"]
    assert check["ok"], check
    d = check["detail"]
    assert d["write"] == d["read"] == "ok" and d["read_back_ok"] and d["host_verified"]
    assert d["src_in_nvme_bar"] is not None
    with open(Path(d["host_file"]), "rb") as f:  # the bytes themselves, read again here
        f.seek(d["offset"])
        data = f.read(d["len"])
    block = bytes((d["seed"] * 7 + k * 13) & 0xFF for k in range(251))
    assert data == (block * (len(data) // 251 + 1))[: len(data)]


def test_hmm_selftest_witness(default_run) -> None:
    check = checks_by_name(default_run[1])["witness.hmm_tests"]
    assert check["ok"], check
    d = check["detail"]
    assert d["failed"] == 0 and d["passed"] >= 20 and not d["timed_out"]
    assert d["passed"] + d["skipped"] >= 40
    for group in d["skipped_groups"]:
        assert group["why"] and "not explained" not in group["why"], group


def _kunit_parse(ktap_file: Path, built_kernel) -> dict[str, str]:
    """The kernel's own KTAP parser (tools/testing/kunit/kunit.py parse --json) on ``ktap_file``: status by name."""
    kunit = (built_kernel.build_dir / "source" / "tools/testing/kunit/kunit.py") if built_kernel.build_dir else None
    if kunit is None or not kunit.is_file():
        pytest.skip("the built kernel's source tree (with tools/testing/kunit) is not in the cache")
    out = ktap_file.with_suffix(".kunit.json").resolve()
    proc = subprocess.run([sys.executable, str(kunit), "parse", f"--json={out}", str(ktap_file.resolve())],
                          capture_output=True, text=True, timeout=60)
    assert out.is_file(), proc.stdout + proc.stderr
    parsed = json.loads(out.read_text())
    return {case["name"]: case["status"] for case in parsed["test_cases"]}


def test_debian_kernel_still_passes_and_says_why_p2pmem_is_absent(tmp_path: Path, debian_kernel,
                                                                   built_kernel) -> None:
    ktap_file = tmp_path / "k.tap"
    proc = run_aperture("run", "--json", "-q", "--kernel", "debian", "--run-dir", str(tmp_path / "r"),
                        "--ktap", str(ktap_file), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    result = json.loads(proc.stdout)
    # The driver's checks cannot run on Debian's kernel: a skip, not a pass, in the JSON and in KTAP alike, and
    # the kernel's own KTAP parser agrees check by check.
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    for name in ("zone_device.window", "hmm.migrate", "hmm.fault_back", "p2p.peer_map", "p2p.peer_map_hidden",
                 "p2p.pinned_vs_remap", "driver.unload", "witness.hmm_tests"):
        assert statuses[name] == "skip", (name, statuses)
    assert statuses["dax.fsdax"] == "pass"
    kunit = _kunit_parse(ktap_file, built_kernel)
    assert kunit == {name: {"pass": "PASS", "skip": "SKIP", "fail": "FAIL"}[st] for name, st in statuses.items()}
    assert result["kernel_release"] == debian_kernel.release
    checks = checks_by_name(result)
    rows = {r["memory"]: r for r in checks["zone_device.probe"]["detail"]["rows"]}
    assert rows["p2pmem"]["result"] == "absent" and "P2PDMA" in rows["p2pmem"]["why"]
    for name in ("zone_device.p2pmem", "p2p.nvme_cmb"):
        assert checks[name]["ok"] and "PCI_P2PDMA" in checks[name]["detail"]["skip_reason"], checks[name]
    assert checks["witness.hmm_tests"]["ok"] and checks["witness.hmm_tests"]["detail"]["skip_reason"]
    for name in ("zone_device.window", "hmm.migrate", "p2p.peer_map", "driver.unload"):  # no driver for it
        assert checks[name]["ok"] and "aperture kernel build" in checks[name]["detail"]["skip_reason"], checks[name]


def test_a_monolithic_user_kernel_boots_without_modules(tmp_path: Path, built_kernel) -> None:
    """A kernel developer's vmlinux with everything needed built in: its IKCONFIG says so, no --modules."""
    own = tmp_path / "linux" / "vmlinux"
    own.parent.mkdir()
    shutil.copy2(built_kernel.image, own)  # no .config beside it: the config comes from IKCONFIG
    proc = run_aperture("run", "--json", "-q", "--kernel", str(own), "--run-dir", str(tmp_path / "r"), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    checks = checks_by_name(json.loads(proc.stdout))
    assert checks["dax.fsdax"]["ok"] and checks["p2p.nvme_cmb"]["ok"]
    assert "skip_reason" in checks["witness.hmm_tests"]["detail"]  # test_hmm is a module; none were given


def test_a_kernel_without_a_needed_feature_names_the_option(tmp_path: Path, built_kernel) -> None:
    own = tmp_path / "vmlinux"
    shutil.copy2(built_kernel.image, own)
    config = tmp_path / "no-nfit.config"
    config.write_text(built_kernel.config_file.read_text().replace("CONFIG_ACPI_NFIT=y", "# CONFIG_ACPI_NFIT is "
                                                                                        "not set"))
    proc = run_aperture("run", "-q", "--kernel", str(own), "--config", str(config), timeout=120)
    assert proc.returncode == 3
    assert "lacks CONFIG_ACPI_NFIT" in proc.stderr and "turn it on" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_kernel_build_again_is_a_cache_hit(built_kernel) -> None:
    proc = run_aperture("kernel", "build", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["vmlinux"] == str(built_kernel.image)
    assert "cached build" in proc.stderr and "compiling" not in proc.stderr
    info = run_aperture("kernel", "info", "--json", timeout=60)
    assert json.loads(info.stdout)["kernel: built"]["release"] == built_kernel.release


def test_a_fragment_option_olddefconfig_drops_stops_the_build(tmp_path: Path, built_kernel) -> None:
    """TEST_HMM depends on RUNTIME_TESTING_MENU: without it, olddefconfig drops TEST_HMM and the build stops."""
    from aperture.guest.kbuild import KernelBuilder, read_fragment

    info = json.loads((built_kernel.image.parent / "kernel.json").read_text())
    options = [o for o in read_fragment() if o.name != "CONFIG_RUNTIME_TESTING_MENU"]
    builder = KernelBuilder(lambda s: None)
    with pytest.raises(SetupError, match=r"olddefconfig dropped .*CONFIG_TEST_HMM=m \(now: not set\)") as err:
        builder._configure(Path(info["src_dir"]), tmp_path / "obj", options)
    assert "CONFIG_HMM_MIRROR=y" in err.value.message  # selected only by TEST_HMM: it goes too, and is named


def test_only_runs_only_the_selected_checks(tmp_path: Path) -> None:
    proc = run_aperture("run", "--json", "-q", "--only", "dax.*", "--skip", "dax.map_sync",
                        "--run-dir", str(tmp_path / "r"), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    names = [c["name"] for c in json.loads(proc.stdout)["checks"]]
    assert names and all(n.startswith("dax.") for n in names), names
    assert "dax.fsdax" in names and "dax.devdax" in names and "dax.map_sync" not in names


def test_a_kernel_build_tree_runs_every_check_with_none_skipped(tmp_path: Path, built_kernel) -> None:
    """--kernel DIR on an O= tree built from Debian's source with aperture's fragment (the built kernel's own
    object tree is one): its image, config and modules, the driver and hmm-tests built against it — every check
    runs, none skips."""
    tree = built_kernel.build_dir
    if tree is None or not (tree / "include/config/kernel.release").is_file():
        pytest.skip("the built kernel's object tree is not in the cache")
    proc = run_aperture("run", "--json", "-q", "--kernel", str(tree), "--run-dir", str(tmp_path / "r"), timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-3000:]
    result = json.loads(proc.stdout)
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    assert set(statuses.values()) == {"pass"}, {k: v for k, v in statuses.items() if v != "pass"}
    assert {"hmm.migrate", "witness.hmm_tests", "p2p.peer_map", "guest.dmesg"} <= set(statuses)
    assert result["kernel_release"] == built_kernel.release


@pytest.mark.parametrize("flavor", ["built", "built-debug"])
def test_gdb_attaches_to_a_vm_started_with_gdb(tmp_path: Path, flavor: str) -> None:
    """`aperture up NAME --gdb` + `aperture gdb NAME -- -batch ...`: gdb with the guest's vmlinux on QEMU's
    gdbstub; on the debug flavour (debug info, the kernel's gdb scripts) lx-lsmod lists aperture's driver."""
    import uuid

    from aperture.guest.errors import SetupError
    from aperture.guest.kernel import built_kernel

    if flavor == "built-debug":
        try:
            built_kernel("debug")
        except SetupError:
            pytest.skip("no debug-flavour kernel in the cache (aperture kernel build --flavor debug)")
    env = {"APERTURE_STATE": str(tmp_path / "state")}
    name = f"g{uuid.uuid4().hex[:6]}"
    up = run_aperture("up", name, "-q", "--gdb", "--kernel", flavor, "--run-dir", str(tmp_path / "run"), env=env,
                      timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        script = ["-batch", "-ex", "info registers rip"] + (["-ex", "lx-lsmod"] if flavor == "built-debug" else [])
        gdb = run_aperture("gdb", name, "--", *script, env=env, timeout=180)
        assert gdb.returncode == 0, gdb.stdout + gdb.stderr
        assert "rip" in gdb.stdout, gdb.stdout + gdb.stderr
        if flavor == "built-debug":
            assert "aperture_drv" in gdb.stdout, gdb.stdout + gdb.stderr
        # the guest runs on after gdb detached
        assert run_aperture("exec", name, "--", "echo alive", env=env, timeout=60).stdout == "alive\n"
    finally:
        run_aperture("down", name, env=env, timeout=60)
