"""Kernel modules: find them by name, read ``.modinfo`` with pyelftools, compute the dependency closure.

Debian's kernel package ships no ``modules.dep``, so dependencies come from each module's own
``depends=`` field, and ``vermagic=`` is checked against the kernel release.
"""

from __future__ import annotations

import io
import lzma
from dataclasses import dataclass
from pathlib import Path

from aperture.guest.errors import SetupError
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise SetupError(f"{path.name}: zstd-compressed modules are not supported; decompress them first")
    return data


def parse_modinfo(elf_bytes: bytes, origin: str = "<module>") -> dict[str, list[str]]:
    """Return the ``key=value`` pairs of the ``.modinfo`` section (a key may repeat)."""
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        section = elf.get_section_by_name(".modinfo")
    except ELFError as exc:
        raise SetupError(f"{origin}: not a kernel module ({exc})") from exc
    if section is None:
        raise SetupError(f"{origin}: no .modinfo section; not a kernel module")
    info: dict[str, list[str]] = {}
    for entry in section.data().split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    depends: tuple[str, ...]
    vermagic: str
    data: bytes  # decompressed ELF


class ModuleIndex:
    """All modules under ``lib/modules/<release>``, indexed by name (``-`` folded to ``_``)."""

    def __init__(self, modules_dir: Path, release: str) -> None:
        if not modules_dir.is_dir():
            raise SetupError(f"kernel modules directory {modules_dir} does not exist")
        self.modules_dir = modules_dir
        self.release = release
        self.paths: dict[str, Path] = {}
        for path in sorted(modules_dir.rglob("*.ko*")):
            if path.name.endswith(_SUFFIXES):
                self.paths.setdefault(module_name(path), path)
        self._cache: dict[str, Module] = {}

    def load(self, name: str) -> Module:
        key = name.replace("-", "_")
        if key in self._cache:
            return self._cache[key]
        path = self.paths.get(key)
        if path is None:
            raise SetupError(f"kernel module {name!r} not found under {self.modules_dir}")
        data = read_module_bytes(path)
        info = parse_modinfo(data, str(path))
        vermagic = (info.get("vermagic") or [""])[0]
        if vermagic.split(" ", 1)[0] != self.release:
            raise SetupError(
                f"module {key} was built for kernel {vermagic.split(' ', 1)[0] or '?'!r}, "
                f"but the kernel is {self.release!r} (modules do not match the kernel; use --modules DIR)"
            )
        deps = tuple(d for dep in info.get("depends", []) for d in dep.split(",") if d)
        module = Module(key, path, deps, vermagic, data)
        self._cache[key] = module
        return module

    def closure(self, names: list[str]) -> list[Module]:
        """Modules ``names`` need, dependencies first, each once, in a stable order."""
        order: list[Module] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            key = name.replace("-", "_")
            if state.get(key) == "done":
                return
            if state.get(key) == "visiting":
                raise SetupError(f"module dependency cycle: {' -> '.join(chain + (key,))}")
            state[key] = "visiting"
            module = self.load(key)
            for dep in module.depends:
                visit(dep, chain + (key,))
            state[key] = "done"
            order.append(module)

        for name in names:
            visit(name, ())
        return order


def read_builtin(modules_dir: Path | None) -> frozenset[str]:
    """Module names the kernel has built in, from ``modules.builtin`` (empty when not given)."""
    if modules_dir is None or not (modules_dir / "modules.builtin").is_file():
        return frozenset()
    names = (module_name(Path(line.strip())) for line in (modules_dir / "modules.builtin").read_text().splitlines())
    return frozenset(n for n in names if n)
