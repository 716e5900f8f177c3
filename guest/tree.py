"""``--kernel DIR``: the kernel of a build tree a developer is working in (in-tree or ``O=``), as ``vng`` runs the
kernel of the tree it stands in.

From the tree: its image (the PVH ``vmlinux`` when it has the note, else ``arch/x86/boot/bzImage``), its
``.config``, its modules (``make modules_install`` into the cache — never into the host's /lib/modules), the
kernel's own ``hmm-tests`` selftest built from its source against its UAPI headers (installed into the cache too),
and the tree itself as the place aperture's driver and the user's modules are built against. The tree is only
read, apart from what kbuild itself writes when asked for ``modules_install`` and ``headers_install``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from aperture.guest.errors import ConfigError, SetupError
from aperture.guest.kernelspec import KernelSpec

from .cache import cache_root, private_tmp
from .elf import pvh_entry
from .kmod import read_builtin

Progress = Callable[[str], None]


def is_kernel_tree(path: Path) -> bool:
    """A directory a kernel was configured (and maybe built) in: in-tree or ``O=``."""
    return path.is_dir() and (path / ".config").is_file() and (path / "Makefile").is_file()


def tree_source(tree: Path) -> Path:
    """The source tree: ``O=`` trees link it as ``source``; an in-tree build is its own source."""
    link = tree / "source"
    return link.resolve() if link.exists() else tree


def tree_image(tree: Path) -> Path:
    vmlinux, bzimage = tree / "vmlinux", tree / "arch/x86/boot/bzImage"
    if vmlinux.is_file() and pvh_entry(vmlinux) is not None:
        return vmlinux
    if bzimage.is_file():
        return bzimage
    if vmlinux.is_file():
        raise ConfigError(f"kernel tree {tree}: vmlinux has no PVH entry note and there is no arch/x86/boot/bzImage "
                          "(build it with `make bzImage`, or turn on CONFIG_PVH)")
    raise ConfigError(f"kernel tree {tree} has no built kernel (no vmlinux, no arch/x86/boot/bzImage): build it "
                      "first (`make -j$(nproc)`)")


def _tree_key(tree: Path, image: Path, release: str) -> str:
    stat = image.stat()
    config = (tree / ".config").read_bytes()
    text = f"{tree}\0{release}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode() + config
    return hashlib.sha256(text).hexdigest()[:16]


def _make(tree: Path, targets: list[str], what: str) -> None:
    if shutil.which("make") is None:
        raise SetupError("make not found: it installs the tree's modules (run scripts/setup.sh)")
    proc = subprocess.run(["make", "-C", str(tree), "-s", *targets], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise SetupError(f"kernel tree {tree}: {what} failed: {lines[-1] if lines else proc.returncode}")


def _hmm_tests(tree: Path, out: Path) -> Path | None:
    """The tree's own tools/testing/selftests/mm/hmm-tests, static, against its UAPI headers (installed into the
    cache); None when the tree has none or it does not build (witness.hmm_tests then says so)."""
    src = tree_source(tree)
    test = src / "tools/testing/selftests/mm/hmm-tests.c"
    gcc = shutil.which("gcc")
    if not test.is_file() or gcc is None:
        return None
    headers = out / "headers"
    if not (headers / "include/linux/types.h").is_file():
        _make(tree, [f"INSTALL_HDR_PATH={headers}", "headers_install"], "headers_install")
    dest = out / "hmm-tests"
    argv = [gcc, "-static", "-O2", "-Wall", "-U_FORTIFY_SOURCE", f"-I{src}", "-isystem", str(headers / "include"),
            "-isystem", str(src / "tools/include/uapi"), "-o", str(dest), str(test), "-lrt", "-lpthread", "-lm"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=test.parent)
    return dest if proc.returncode == 0 else None


def tree_kernel(tree: Path, progress: Progress | None = None) -> KernelSpec:
    """The kernel of build tree ``tree``, its modules and hmm-tests prepared in the cache (once per build)."""
    say = progress or (lambda _s: None)
    tree = tree.expanduser().resolve()
    if not is_kernel_tree(tree):
        raise ConfigError(f"{tree} is not a kernel build tree (no .config and Makefile): name a bzImage or vmlinux "
                          "file, or the directory a kernel was built in (in-tree or O=)")
    release_file = tree / "include/config/kernel.release"
    if not release_file.is_file():
        raise ConfigError(f"kernel tree {tree} has not been built (no include/config/kernel.release): build it "
                          "first (`make -j$(nproc)`)")
    release = release_file.read_text().strip()
    image = tree_image(tree)
    out = cache_root() / "trees" / _tree_key(tree, image, release)
    done = out / ".complete"
    if not done.exists():
        say(f"kernel tree {tree}: installing its modules and building its hmm-tests into {out}")
        staging = private_tmp(out)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            if (tree / "modules.order").is_file():
                _make(tree, [f"INSTALL_MOD_PATH={staging / 'root'}", "INSTALL_MOD_STRIP=1", "modules_install"],
                      "modules_install")
            _hmm_tests(tree, staging)
            (staging / ".complete").touch()
            shutil.rmtree(out, ignore_errors=True)
            staging.replace(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    modules = out / "root/lib/modules" / release
    hmm = out / "hmm-tests"
    mods = modules if modules.is_dir() else None
    return KernelSpec(image, mods, release, tree / ".config", "tree", read_builtin(mods or tree),
                      hmm if hmm.is_file() else None, tree)
