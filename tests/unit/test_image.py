"""The guest image: contents, the shared-library closure of host binaries, caching by input hash."""

import os
from pathlib import Path

import pytest
from aperture.guest.cpio import read_cpio
from aperture.guest.elf import binary_closure
from aperture.guest.errors import SetupError
from aperture.guest.image import _prune, build_image


def test_mke2fs_closure_has_loader_and_libs() -> None:
    files = binary_closure(Path("/sbin/mke2fs"))
    assert "/lib64/ld-linux-x86-64.so.2" in files
    assert "/lib/x86_64-linux-gnu/libc.so.6" in files
    assert "/lib/x86_64-linux-gnu/libext2fs.so.2" in files
    assert all(p.is_file() for p in files.values())


def test_static_binary_has_empty_closure(tmp_path: Path) -> None:
    from aperture.guest.image import build_helper

    assert binary_closure(build_helper(tmp_path)) == {}


def test_image_contents_and_cache(debian_kernel, tmp_path: Path) -> None:
    img = build_image(debian_kernel, cache=tmp_path)
    assert not img.cached
    names = {e.name for e in read_cpio(img.path.read_bytes())}
    for needed in ("init", "bin/busybox", "bin/aperture-helper", "usr/local/bin/mke2fs", "lib64/ld-linux-x86-64.so.2",
                   "lib/modules/nd_pmem.ko", "lib/modules/ext4.ko", "lib/modules/jbd2.ko", "etc/aperture/modules"):
        assert needed in names
    order = next(e for e in read_cpio(img.path.read_bytes()) if e.name == "etc/aperture/modules").data.split()
    assert order.index(b"libnvdimm") < order.index(b"nd_pmem") and order.index(b"jbd2") < order.index(b"ext4")
    again = build_image(debian_kernel, cache=tmp_path)
    assert again.cached and again.path == img.path


def test_guest_bin_changes_the_image(debian_kernel, tmp_path: Path) -> None:
    base = build_image(debian_kernel, cache=tmp_path)
    with_bin = build_image(debian_kernel, cache=tmp_path, guest_bins=(Path("/usr/bin/env"),))
    assert with_bin.digest != base.digest
    assert "usr/local/bin/env" in {e.name for e in read_cpio(with_bin.path.read_bytes())}


def test_busybox_missing_is_setup_error(debian_kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APERTURE_CACHE", str(tmp_path))
    with pytest.raises(SetupError, match="busybox"):
        build_image(debian_kernel, cache=tmp_path)


def test_cache_keeps_the_newest_images_and_helpers(tmp_path: Path) -> None:
    for i in range(8):
        image = tmp_path / "images" / f"initramfs-{i}.cpio"
        helper = tmp_path / "helper" / f"h{i}" / "aperture-helper"
        for path in (image, helper):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            os.utime(path, (1000 + i, 1000 + i))
    _prune(tmp_path / "images", "initramfs-*.cpio", keep=3)
    _prune(tmp_path / "helper", "*/aperture-helper", keep=3)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"initramfs-{i}.cpio" for i in (5, 6, 7)]
    assert sorted(p.name for p in (tmp_path / "helper").iterdir()) == ["h5", "h6", "h7"]
