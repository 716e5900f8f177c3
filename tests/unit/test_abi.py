"""One ABI definition: the committed C header is exactly what guest/abi.py generates, and both agree."""

import shutil
import subprocess
from pathlib import Path

import pytest
from aperture.guest import abi

HEADER = Path(__file__).resolve().parents[2] / "guest" / "helper" / "aperture_abi.h"


def test_committed_header_is_generated() -> None:
    assert HEADER.read_text() == abi.c_header(), "run: python -m aperture.guest.abi > guest/helper/aperture_abi.h"


def test_layout_fits_and_does_not_overlap() -> None:
    spans = []
    for name, (off, kind) in abi.REGS.items():
        size = {"u32": 4, "u64": 8}.get(kind, 0)
        if name == "SLOT_TABLE":
            size = 8 * abi.MAX_SLOTS
        elif name == "HIDDEN":
            size = 16 * abi.MAX_HIDDEN
        elif kind == "desc":
            size = abi.DESC_SIZE * abi.RING_ENTRIES
        elif kind == "compl":
            size = abi.COMPL_SIZE * abi.RING_ENTRIES
        assert off % (8 if kind != "u32" else 4) == 0, name
        spans.append((off, off + size, name))
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:], strict=False):
        assert a1 <= b0, f"{an} overlaps {bn}"
    assert spans[-1][1] <= abi.CTL_SIZE
    assert abi.CTL_SIZE & (abi.CTL_SIZE - 1) == 0  # a BAR size: power of two


def test_descriptor_round_trip() -> None:
    d = abi.Descriptor(abi.OP_DMA, abi.DMA_SRC_LOCAL, 7, 3, 0, 9, 0x1000, 0x2000, 4096, 0, 0)
    assert abi.Descriptor.unpack(d.pack()) == d
    assert len(d.pack()) == 64


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_c_structs_match_python_sizes(tmp_path: Path) -> None:
    src = tmp_path / "t.c"
    src.write_text(f'#include "{HEADER}"\n#include <stddef.h>\n'
                   "_Static_assert(offsetof(struct aperture_desc, length) == 40, \"length\");\n"
                   "_Static_assert(offsetof(struct aperture_compl, result) == 8, \"result\");\n"
                   "int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-fsyntax-only", str(src)], check=True)
    # and the Python side agrees on those offsets
    raw = abi.DESC.pack(0, 0, 0, 0, 0, 0, 0, 0, 0xABCDEF, 0, 0)
    assert int.from_bytes(raw[40:48], "little") == 0xABCDEF
    assert int.from_bytes(abi.COMPL.pack(0, 0, 0, 77)[8:16], "little") == 77
