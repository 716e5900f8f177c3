import shutil
import subprocess
from pathlib import Path

import pytest
from aperture.guest.elf import check_static_x86_64, elf_facts
from aperture.guest.errors import ConfigError, SetupError
from aperture.guest.image import build_helper
from aperture.guest.kernel import kernel_format, kernel_release


def test_helper_is_static_x86_64(tmp_path: Path) -> None:
    helper = build_helper(tmp_path)
    check_static_x86_64(helper)
    assert build_helper(tmp_path) == helper  # cached by source hash


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_dynamic_binary_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "a.c"
    src.write_text("int main(void){return 0;}\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "a"), str(src)], check=True)
    facts = elf_facts(tmp_path / "a")
    assert facts.interpreter and "libc.so.6" in facts.needed
    with pytest.raises(SetupError, match="dynamically linked"):
        check_static_x86_64(tmp_path / "a")


def test_not_elf(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello")
    with pytest.raises(SetupError, match="not an ELF"):
        check_static_x86_64(tmp_path / "x")


def test_bzimage_format_and_release(debian_kernel) -> None:
    assert kernel_format(debian_kernel.image) == "bzimage"
    assert kernel_release(debian_kernel.image) == debian_kernel.release


def test_pvh_vmlinux_extracted_and_recognised(debian_kernel) -> None:
    from aperture.guest.pvh import extract_pvh_vmlinux

    vmlinux, why = extract_pvh_vmlinux(debian_kernel)
    if vmlinux is None:
        pytest.skip(why)
    assert kernel_format(vmlinux) == "pvh-elf"
    assert kernel_release(vmlinux) == debian_kernel.release


def test_elf_without_pvh_note_is_refused(tmp_path: Path) -> None:
    exe = Path(shutil.which("true") or "/bin/true")
    with pytest.raises(ConfigError, match="PVH"):
        kernel_format(exe)
