"""Module closure and vermagic against the real cached Debian kernel package."""

import lzma
import shutil
from pathlib import Path

import pytest
from aperture.guest.errors import SetupError
from aperture.guest.kmod import ModuleIndex, parse_modinfo


@pytest.fixture(scope="module")
def index(debian_kernel) -> ModuleIndex:
    return ModuleIndex(debian_kernel.modules_dir, debian_kernel.release)


def test_index_has_thousands_of_modules(index: ModuleIndex) -> None:
    assert len(index.paths) > 1000
    assert "nd_pmem" in index.paths and "device_dax" in index.paths


def test_closure_puts_dependencies_first(index: ModuleIndex) -> None:
    names = [m.name for m in index.closure(["device_dax", "nd_pmem", "nfit"])]
    assert names.index("libnvdimm") < names.index("nd_pmem")
    assert names.index("libnvdimm") < names.index("nfit")
    assert len(names) == len(set(names))
    for m in index.closure(["nd_pmem"]):
        assert m.data[:4] == b"\x7fELF"


def test_ext4_closure_matches_platform_facts(index: ModuleIndex) -> None:
    names = [m.name for m in index.closure(["ext4"])]
    for dep in ("jbd2", "mbcache", "crc16"):
        assert dep in names and names.index(dep) < names.index("ext4")


def test_vermagic_matches_release(index: ModuleIndex) -> None:
    m = index.load("nfit")
    assert m.vermagic.startswith(index.release + " ")


def test_unknown_module(index: ModuleIndex) -> None:
    with pytest.raises(SetupError, match="not found"):
        index.closure(["no_such_module"])


def test_mismatched_vermagic_is_a_clear_error(index: ModuleIndex, tmp_path: Path, debian_kernel) -> None:
    src = index.paths["libnvdimm"]
    raw = lzma.decompress(src.read_bytes())
    old = debian_kernel.release.encode()
    fake = old[:-1] + (b"X" if old[-1:] != b"X" else b"Y")
    patched = raw.replace(b"vermagic=" + old, b"vermagic=" + fake)
    assert patched != raw
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "libnvdimm.ko").write_bytes(patched)
    bad = ModuleIndex(tmp_path, debian_kernel.release)
    with pytest.raises(SetupError) as info:
        bad.closure(["libnvdimm"])
    assert fake.decode() in info.value.message and debian_kernel.release in info.value.message


def test_parse_modinfo_rejects_non_elf() -> None:
    with pytest.raises(SetupError):
        parse_modinfo(b"not an elf", "x")


def test_missing_modules_dir(tmp_path: Path) -> None:
    with pytest.raises(SetupError):
        ModuleIndex(tmp_path / "nope", "1.0")
    shutil.rmtree(tmp_path)
