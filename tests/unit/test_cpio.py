import io
import shutil
import stat
import subprocess

import pytest
from aperture.guest.cpio import CpioWriter, read_cpio


def _archive() -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.dir("bin")
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.chardev("console", 5, 1)
    w.file("odd", b"x" * 5)  # exercises 4-byte padding
    w.close()
    return buf.getvalue()


def test_round_trip_python() -> None:
    entries = read_cpio(_archive())
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries] == ["bin", "bin/hello", "bin/sh", "console", "odd"]
    assert stat.S_ISDIR(by_name["bin"].mode)
    assert by_name["bin/hello"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(by_name["bin/hello"].mode) == 0o755
    assert stat.S_ISLNK(by_name["bin/sh"].mode) and by_name["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(by_name["console"].mode) and by_name["console"].rdev == (5, 1)
    assert by_name["odd"].data == b"xxxxx"


def test_archive_is_512_aligned() -> None:
    assert len(_archive()) % 512 == 0


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_gnu_cpio_lists_it() -> None:
    out = subprocess.run(["cpio", "-t"], input=_archive(), capture_output=True, check=True).stdout.decode()
    assert out.split() == ["bin", "bin/hello", "bin/sh", "console", "odd"]


def test_duplicate_names_rejected() -> None:
    w = CpioWriter(io.BytesIO())
    w.dir("a")
    with pytest.raises(ValueError):
        w.dir("a")


def test_bad_magic() -> None:
    with pytest.raises(ValueError):
        read_cpio(b"garbage" * 100)


def test_missing_parents_are_created() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("usr/local/bin/tool", b"x")
    w.close()
    names = [e.name for e in read_cpio(buf.getvalue())]
    assert names == ["usr", "usr/local", "usr/local/bin", "usr/local/bin/tool"]
