"""ELF facts the image build relies on, read with pyelftools: static executables and the PVH entry note."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aperture.guest.errors import SetupError
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

#: Xen ELF note type that carries the 32-bit PVH entry point (include/xen/interface/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _open(path: Path) -> tuple[ELFFile, object]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return ELFFile(f), f
    except ELFError as exc:
        f.close()
        raise SetupError(f"{path} is not an ELF file") from exc


@dataclass(frozen=True)
class ElfFacts:
    machine: str
    elf_class: int
    elf_type: str
    interpreter: str | None
    needed: tuple[str, ...]


def elf_facts(path: Path) -> ElfFacts:
    elf, f = _open(path)
    with f:  # type: ignore[attr-defined]
        interp = None
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()  # type: ignore[attr-defined]  # an InterpSegment
        needed: list[str] = []
        dyn = elf.get_section_by_name(".dynamic")
        if dyn is not None:
            needed = [t.needed for t in dyn.iter_tags()  # type: ignore[attr-defined]  # a DynamicSection
                      if t.entry.d_tag == "DT_NEEDED"]
        return ElfFacts(elf["e_machine"], elf.elfclass, elf["e_type"], interp, tuple(needed))


def check_static_x86_64(path: Path) -> None:
    """Raise unless ``path`` is a statically linked x86-64 executable (what the guest helper must be)."""
    facts = elf_facts(path)
    if facts.machine != "EM_X86_64" or facts.elf_class != 64:
        raise SetupError(f"{path} is {facts.machine}/{facts.elf_class}-bit, not x86-64")
    if facts.elf_type not in ("ET_EXEC", "ET_DYN"):
        raise SetupError(f"{path} is not an executable ({facts.elf_type})")
    if facts.interpreter or facts.needed:
        raise SetupError(
            f"{path} is dynamically linked (interpreter {facts.interpreter}, needs {', '.join(facts.needed)})"
        )


def pvh_entry(path: Path) -> int | None:
    """The PVH entry address of an ELF vmlinux (Xen PHYS32_ENTRY note), or None if it has none."""
    elf, f = _open(path)
    with f:  # type: ignore[attr-defined]
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():  # type: ignore[attr-defined]  # a NoteSegment
                if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                    desc = note["n_desc"]
                    raw = desc if isinstance(desc, bytes) else bytes.fromhex(desc)
                    return int.from_bytes(raw[:8], "little")
    return None


#: Where the guest's dynamic loader looks (Debian multiarch first); host copies are found in the same places.
LIBRARY_DIRS = (Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu"), Path("/lib64"),
                Path("/usr/lib64"), Path("/lib"), Path("/usr/lib"))


def _find_library(name: str, rpath: tuple[Path, ...]) -> Path | None:
    for d in rpath + LIBRARY_DIRS:
        cand = d / name
        if cand.exists():
            return cand
    return None


def binary_closure(path: Path) -> dict[str, Path]:
    """Everything a host binary needs to run in the guest: guest path → host file.

    Reads PT_INTERP and DT_NEEDED (transitively) with pyelftools; a library that cannot be found is a
    SetupError naming it. The binary itself is not included.
    """
    out: dict[str, Path] = {}
    todo = [path]
    seen: set[Path] = set()
    while todo:
        current = todo.pop()
        real = current.resolve()
        if real in seen:
            continue
        seen.add(real)
        facts = elf_facts(real)
        if facts.machine != "EM_X86_64":
            raise SetupError(f"{current} is {facts.machine}, not x86-64")
        if facts.interpreter and facts.interpreter not in out:
            out[facts.interpreter] = Path(facts.interpreter).resolve()
        for lib in facts.needed:
            found = _find_library(lib, ())
            if found is None:
                raise SetupError(f"{path}: needed library {lib} not found on the host")
            guest_path = f"/lib/x86_64-linux-gnu/{lib}"
            if guest_path not in out:
                out[guest_path] = found.resolve()
                todo.append(found)
    return out
