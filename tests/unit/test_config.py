import pytest
from aperture.emulator.config import NVDIMM_LABEL_SIZE, PmemConfig, VmConfig, ram_ranges
from aperture.guest.errors import ConfigError
from aperture.guest.units import GiB, MiB, format_size, parse_size


@pytest.mark.parametrize("text,value", [("4096", 4096), ("256M", 256 * MiB), ("1G", GiB), ("2m", 2 * MiB),
                                        ("128KiB", 128 * 1024), ("1GB", GiB), ("0x10", 16),
                                        ("0x3000000", 48 * MiB), ("0X1M", MiB)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "-1M", "1.5G", "0x", "0xZZ", "1x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_pmem_file_size_adds_label() -> None:
    p = PmemConfig.parse("256M")
    assert p.size == 256 * MiB and p.mode == "raw"
    assert p.file_size == 256 * MiB + NVDIMM_LABEL_SIZE


@pytest.mark.parametrize("text,msg", [("7M", "too small"), ("17M", "multiple of 2M"), ("256M:bogus", "mode"),
                                      ("33M:devdax", "multiple of 2M")])
def test_pmem_rejects(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        PmemConfig.parse(text)


def test_pmem_modes() -> None:
    assert PmemConfig.parse("512M:devdax").mode == "devdax"
    assert PmemConfig.parse("64M:fsdax").size == 64 * MiB


def test_ram_layout_splits_at_2g() -> None:
    """Guest RAM beyond 2 GiB continues at 4 GiB (q35, max-ram-below-4g=2G) and at 2 GiB in the backing file."""
    assert ram_ranges(512 * MiB) == [(0, 0, 512 * MiB)]
    assert ram_ranges(2 * GiB) == [(0, 0, 2 * GiB)]
    assert ram_ranges(3 * GiB) == [(0, 0, 2 * GiB), (4 * GiB, 2 * GiB, GiB)]


def test_vm_config_validation() -> None:
    VmConfig()
    with pytest.raises(ConfigError):
        VmConfig(memory=64 * MiB)
    VmConfig(memory=3 * GiB)
    with pytest.raises(ConfigError, match="above the supported 16G"):
        VmConfig(memory=17 * GiB)
    with pytest.raises(ConfigError):
        VmConfig(accel="xen")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        VmConfig(kernel_cmdline_extra=("two words",))
    with pytest.raises(ConfigError):
        VmConfig(pmem=tuple(PmemConfig() for _ in range(9)))


def test_format_size() -> None:
    assert format_size(256 * MiB) == "256M"
    assert format_size(GiB) == "1G"
    assert format_size(1000) == "1000"


def test_shares_parse_and_refuse(tmp_path) -> None:
    import pytest
    from aperture.emulator.config import ShareConfig
    from aperture.guest.errors import ConfigError

    s = ShareConfig.parse(f"{tmp_path}")
    assert (s.host, s.guest, s.readonly) == (tmp_path, str(tmp_path), False)
    s = ShareConfig.parse(f"{tmp_path}:/mnt/data/:ro")
    assert (s.guest, s.readonly) == ("/mnt/data", True)
    for bad, why in [(f"{tmp_path}/nope", "does not exist"), (f"{tmp_path}:/usr/local/x", "system directory"),
                     (f"{tmp_path}:/", "system directory"), (f"{tmp_path}:/mnt/a b", "without spaces"),
                     (f"{tmp_path}:relative", "absolute"), (f"{tmp_path}:/a:/b:ro", "expected HOSTDIR")]:
        with pytest.raises(ConfigError, match=why):
            ShareConfig.parse(bad)


def test_shares_reach_qemu_quoted_and_the_guest_by_tag(tmp_path) -> None:
    from pathlib import Path

    from aperture.emulator.config import ShareConfig, VmConfig
    from aperture.emulator.runpaths import RunPaths
    from aperture.emulator.vm.qemu_argv import build_argv, kernel_cmdline
    from aperture.guest.kernelspec import KernelSpec

    odd = tmp_path / "a,readonly=off"
    odd.mkdir()
    config = VmConfig(shares=(ShareConfig(odd, "/mnt/x", readonly=True), ShareConfig(tmp_path, "/work")))
    paths = RunPaths(Path("/r"), "t", Path("/dev/shm"), Path("/s"))
    argv = build_argv("qemu", config, KernelSpec(Path("/k"), None, "6.1"), Path("/i"), paths, "tcg",
                      kernel_cmdline(config, "idle"))
    fsdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-fsdev"]
    assert fsdevs[0] == f"local,id=share0,path={str(odd).replace(',', ',,')},security_model=none,readonly=on"
    assert fsdevs[1] == f"local,id=share1,path={tmp_path},security_model=none"
    assert "aperture_shares=share0:/mnt/x:ro,share1:/work:rw" in kernel_cmdline(config, "idle")
