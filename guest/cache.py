"""Where guest packages, built helpers and images are cached (XDG cache dir, overridable)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    env = os.environ.get("APERTURE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "aperture"


def manifest_path(root: Path | None = None) -> Path:
    return (root or cache_root()) / "manifest.json"


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    try:
        data = json.loads(manifest_path(root).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def private_tmp(path: Path) -> Path:
    """A temporary sibling of ``path`` no other process writes (parallel pytest workers build the same files);
    write it, then ``replace`` it onto ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")


def mtime_or_zero(path: Path) -> float:
    """Modification time, or 0 for a file another process removed meanwhile (parallel runs prune one cache)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_manifest(data: dict[str, Any], root: Path | None = None) -> None:
    path = manifest_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
