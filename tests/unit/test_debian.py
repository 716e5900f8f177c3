"""Debian's kernel packages in each layout they have had: /boot + /lib/modules (Debian 12), merged /usr
(Debian 13), and the split packaging of 6.19 and later (image, modules and config in separate packages)."""

from pathlib import Path

import pytest
from aperture.guest import debian
from aperture.guest.debian import kernel_parts, locate_kernel


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_bookworm_layout(tmp_path: Path) -> None:
    rel = "6.12.38+deb12-amd64"
    image = _touch(tmp_path / f"boot/vmlinuz-{rel}")
    config = _touch(tmp_path / f"boot/config-{rel}")
    _touch(tmp_path / f"lib/modules/{rel}/kernel/fs/ext4/ext4.ko.xz")
    found = locate_kernel(tmp_path)
    assert found is not None
    assert (found.image, found.release, found.config) == (image, rel, config)
    assert found.modules_dir == tmp_path / "lib/modules" / rel


def test_merged_usr_layout(tmp_path: Path) -> None:
    rel = "6.12.57+deb13-amd64"
    image = _touch(tmp_path / f"boot/vmlinuz-{rel}")
    _touch(tmp_path / f"boot/config-{rel}")
    _touch(tmp_path / f"usr/lib/modules/{rel}/kernel/fs/ext4/ext4.ko.xz")
    found = locate_kernel(tmp_path)
    assert found is not None and found.image == image
    assert found.modules_dir == tmp_path / "usr/lib/modules" / rel


def test_split_layout(tmp_path: Path) -> None:
    rel = "7.3.4+deb13-amd64"
    moddir = tmp_path / "usr/lib/modules" / rel
    image = _touch(moddir / "vmlinuz")  # linux-binary-*
    config = _touch(moddir / "config")  # linux-base-*
    _touch(moddir / "kernel/fs/ext4/ext4.ko.xz")  # linux-modules-*
    found = locate_kernel(tmp_path)
    assert found is not None
    assert (found.image, found.config, found.modules_dir) == (image, config, moddir)


def test_metapackage_alone_holds_no_kernel(tmp_path: Path) -> None:
    _touch(tmp_path / "usr/share/doc/linux-image-7.3.4+deb13-amd64/copyright")
    assert locate_kernel(tmp_path) is None


def test_split_parts_come_from_the_image_package_depends(monkeypatch: pytest.MonkeyPatch) -> None:
    show = ("Package: linux-image-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\n"
            "Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.3.4+deb13-amd64 "
            "(= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), "
            "linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n")
    monkeypatch.setattr(debian, "_run", lambda argv: show)
    assert kernel_parts("linux-image-7.3.4+deb13-amd64") == (
        "linux-base-7.3.4+deb13-amd64", "linux-binary-7.3.4+deb13-amd64", "linux-modules-7.3.4+deb13-amd64")
    whole = "Package: linux-image-6.12.57+deb13-amd64\nDepends: kmod, linux-base (>= 4.12~), initramfs-tools\n"
    monkeypatch.setattr(debian, "_run", lambda argv: whole)
    assert kernel_parts("linux-image-6.12.57+deb13-amd64") == ()
