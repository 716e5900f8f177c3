"""``KernelSpec``: which guest kernel a VM boots, and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KernelKind = Literal["built", "debian", "user", "tree"]


@dataclass(frozen=True)
class KernelSpec:
    """A guest kernel, the directory of its modules (``lib/modules/<release>``; None for a kernel with
    everything built in), its config where known, and what it has built in (``modules.builtin``)."""

    image: Path
    modules_dir: Path | None
    release: str
    config_file: Path | None = None
    kind: KernelKind = "user"
    builtin: frozenset[str] = frozenset()
    hmm_tests: Path | None = None  # the kernel's own static hmm-tests selftest, built from the same tree
    build_dir: Path | None = None  # the kbuild object tree it was built in (out-of-tree modules build there)

    def to_dict(self) -> dict[str, object]:
        return {"image": str(self.image), "modules_dir": str(self.modules_dir) if self.modules_dir else None,
                "release": self.release, "config_file": str(self.config_file) if self.config_file else None,
                "kind": self.kind, "builtin": sorted(self.builtin),
                "hmm_tests": str(self.hmm_tests) if self.hmm_tests else None,
                "build_dir": str(self.build_dir) if self.build_dir else None}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KernelSpec:
        def opt(key: str) -> Path | None:
            value = data.get(key)
            return Path(str(value)) if value else None

        kind = str(data.get("kind", "user"))
        builtin = data.get("builtin") or []
        return cls(Path(str(data["image"])), opt("modules_dir"), str(data["release"]), opt("config_file"),
                   kind if kind in ("built", "debian", "user", "tree") else "user",  # type: ignore[arg-type]
                   frozenset(str(b) for b in builtin) if isinstance(builtin, list) else frozenset(),
                   opt("hmm_tests"), opt("build_dir"))
