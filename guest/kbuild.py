"""``aperture kernel build``: the guest kernel built for the job from Debian's ``linux-source`` package.

Debian's prebuilt kernels lack PCI_P2PDMA and DEVICE_PRIVATE (bookworm) or boot slowly and cannot take
out-of-tree modules built on this host (trixie and later). So the default guest kernel is built here:
``tinyconfig`` plus the project's fragment (``guest/kconfig/aperture.config``), every wanted option checked
after ``olddefconfig``, built with ccache when the host has it. The result (PVH vmlinux, bzImage, config,
installed modules, the kernel's own ``hmm-tests`` selftest) is cached under a key of the source version, the
fragment's hash and the compiler version, so it is rebuilt only when one of them changes. The source package
is downloaded into the cache and unpacked there; nothing is installed on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from aperture.guest.errors import SetupError

from .cache import cache_root, mtime_or_zero, private_tmp, read_manifest, write_manifest
from .debian import DebFile, download, resolve_uri

Progress = Callable[[str], None]

#: Bump when the layout of a cached build changes, so older builds are not used.
KBUILD_FORMAT = 1
#: Debian's source package of the kernel series the fragment is written for.
SOURCE_PACKAGE = "linux-source-6.12"
#: Builds kept in the cache (each ~40 MB; the source tree and object dir of the newest source are kept too).
KEEP_BUILDS = 3

_OPTION_RE = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(\S+)\s*(?:#\s*(.*))?$")


@dataclass(frozen=True)
class FragmentOption:
    """One line of the fragment: ``CONFIG_X=value  # why``."""

    name: str
    value: str
    why: str

    @property
    def line(self) -> str:
        return f"{self.name}={self.value}"


#: Kernel flavours: the fragments each is built from, in order (a later line wins for the same option).
FLAVORS: dict[str, tuple[str, ...]] = {"default": ("aperture.config",), "debug": ("aperture.config", "debug.config")}


def fragment_path(name: str = "aperture.config") -> Path:
    return Path(str(resources.files("aperture.guest") / "kconfig" / name))


def flavor_options(flavor: str = "default") -> list[FragmentOption]:
    """The options of a flavour: its fragments in order, a later line replacing an earlier one of that option."""
    if flavor not in FLAVORS:
        raise SetupError(f"unknown kernel flavour {flavor!r}: {', '.join(FLAVORS)}")
    merged: dict[str, FragmentOption] = {}
    for name in FLAVORS[flavor]:
        for option in read_fragment(fragment_path(name)):
            merged.pop(option.name, None)
            merged[option.name] = option
    return list(merged.values())


def read_fragment(path: Path | None = None) -> list[FragmentOption]:
    """Parse the fragment; every option needs a reason beside it (the file is documentation too)."""
    path = path or fragment_path()
    options: list[FragmentOption] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _OPTION_RE.match(line)
        if m is None:
            raise SetupError(f"{path}:{number}: expected 'CONFIG_NAME=value  # why', got {line!r}")
        if not m.group(3):
            raise SetupError(f"{path}:{number}: {m.group(1)} has no comment saying why it is there")
        options.append(FragmentOption(m.group(1), m.group(2), m.group(3).strip()))
    if not options:
        raise SetupError(f"{path}: no options")
    return options


def fragment_hash(options: list[FragmentOption]) -> str:
    """Hash of the options only: rewording a comment does not rebuild the kernel."""
    return hashlib.sha256("\n".join(o.line for o in options).encode()).hexdigest()[:16]


def compiler_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SetupError("gcc not found: it builds the guest kernel (run scripts/setup.sh)")
    out = subprocess.run([gcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    return (out.splitlines() or ["gcc ?"])[0].strip()


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X`` → value (``n`` for ``# CONFIG_X is not set``)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def dropped_options(options: list[FragmentOption], config: dict[str, str]) -> list[str]:
    """Fragment options that ``olddefconfig`` did not keep, as ``CONFIG_X=want (now: got)``."""
    return [f"{o.line} (now: {config.get(o.name, 'not set')})" for o in options
            if config.get(o.name, "n") != o.value]


@dataclass(frozen=True)
class BuiltKernel:
    """A cached build: everything a run needs from it, and the key it was built under."""

    key: str
    release: str
    source_version: str
    fragment_hash: str
    compiler: str
    vmlinux: Path
    bzimage: Path
    config: Path
    modules_dir: Path
    hmm_tests: Path | None
    build_s: float
    obj_dir: Path | None = None  # the kbuild object tree (shared by builds of one source version)

    def to_json(self) -> dict[str, object]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> BuiltKernel:
        def path(key: str) -> Path:
            return Path(str(data[key]))

        return cls(key=str(data["key"]), release=str(data["release"]), source_version=str(data["source_version"]),
                   fragment_hash=str(data["fragment_hash"]), compiler=str(data["compiler"]),
                   vmlinux=path("vmlinux"), bzimage=path("bzimage"), config=path("config"),
                   modules_dir=path("modules_dir"),
                   hmm_tests=Path(str(data["hmm_tests"])) if data.get("hmm_tests") else None,
                   build_s=float(str(data.get("build_s", 0.0))),
                   obj_dir=Path(str(data["obj_dir"])) if data.get("obj_dir") else None)

    def complete(self) -> bool:
        return all(p.exists() for p in (self.vmlinux, self.bzimage, self.config, self.modules_dir))


def build_key(source_version: str, frag_hash: str, compiler: str) -> str:
    text = json.dumps([KBUILD_FORMAT, source_version, frag_hash, compiler])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def kernels_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "kernels"


def cached_builds(root: Path | None = None) -> list[BuiltKernel]:
    """Every complete build in the cache, newest first."""
    out = []
    base = kernels_dir(root)
    for info in sorted(base.glob("*/kernel.json"), key=mtime_or_zero, reverse=True):
        try:
            built = BuiltKernel.from_json(json.loads(info.read_text()))
        except (OSError, ValueError, KeyError):
            continue
        if built.complete():
            out.append(built)
    return out


def current_build(root: Path | None = None, flavor: str = "default") -> BuiltKernel | None:
    """The cached build of ``flavor`` made from today's fragments with today's compiler (any source version)."""
    want_frag = fragment_hash(flavor_options(flavor))
    compiler = compiler_version()
    for built in cached_builds(root):
        if built.fragment_hash == want_frag and built.compiler == compiler:
            return built
    return None


def _source_version(deb: DebFile) -> str:
    """``linux-source-6.12_6.12.117-1~deb12u1_all.deb`` → ``6.12.117-1~deb12u1``."""
    parts = deb.filename.split("_")
    return parts[1].replace("%7e", "~").replace("%7E", "~") if len(parts) >= 2 else deb.filename


@dataclass
class _MakeProgress:
    """What kbuild's quiet output says it is doing: the file it is on, and how many it has done."""

    current: str = ""
    objects: int = 0

    def step(self, path: str) -> None:
        self.current = path
        self.objects += 1


class KernelBuilder:
    """Fetch, configure, build and cache the guest kernel; each step says what it does."""

    def __init__(self, progress: Progress, *, root: Path | None = None, verbose: bool = False,
                 jobs: int | None = None, output: Callable[[str], None] | None = None,
                 fragment: Path | None = None, flavor: str = "default") -> None:
        self.progress = progress
        self.fragment = fragment
        self.flavor = flavor
        self.root = root or cache_root()
        self.verbose = verbose
        self.jobs = jobs or os.cpu_count() or 1
        self.output = output or (lambda line: None)

    # ---------------------------------------------------------------- the steps
    def build(self, force: bool = False) -> BuiltKernel:
        options = read_fragment(self.fragment) if self.fragment else flavor_options(self.flavor)
        frag = fragment_hash(options)
        compiler = compiler_version()
        try:
            deb = resolve_uri(SOURCE_PACKAGE)
        except SetupError as exc:
            cached = current_build(self.root, self.flavor)
            if cached is not None and not force:
                self.progress(f"kernel: {SOURCE_PACKAGE} not resolvable ({exc.message}); using the cached build "
                              f"{cached.release}")
                return cached
            raise
        version = _source_version(deb)
        key = build_key(version, frag, compiler)
        out = kernels_dir(self.root) / key
        info = out / "kernel.json"
        if info.exists() and not force:
            built = BuiltKernel.from_json(json.loads(info.read_text()))
            if built.complete():
                self.progress(f"kernel: cached build {built.release} ({key}: {SOURCE_PACKAGE} {version}, "
                              f"fragment {frag}, {compiler})")
                self._gdb_scripts(options, built)
                self._record(built)
                self._driver(built)
                return built
        started = time.monotonic()
        self.progress(f"kernel: building {SOURCE_PACKAGE} {version} with fragment {frag} "
                      f"({len(options)} options), {compiler}, {self.jobs} jobs"
                      f"{', ccache' if shutil.which('ccache') else ''} — about 10 minutes on 2 cores the first "
                      "time, a minute or less from ccache after that")
        src = self._unpack(deb, version)
        # One object tree per flavour: switching flavours must not reconfigure (and rebuild) the other's tree.
        obj = self.root / "kbuild" / (f"obj-{version}" if self.flavor == "default" else f"obj-{version}-{self.flavor}")
        obj.mkdir(parents=True, exist_ok=True)
        self._configure(src, obj, options)
        self._make(src, obj, ["bzImage", "vmlinux", "modules"] + self._gdb_targets(options), "compiling")
        built = self._install(src, obj, out, key=key, version=version, frag=frag, compiler=compiler,
                              started=started)
        self._record(built)
        self._prune(keep=KEEP_BUILDS)
        self.progress(f"kernel: built {built.release} in {built.build_s:.0f} s → {out}")
        self._driver(built)
        return built

    @staticmethod
    def _gdb_targets(options: list[FragmentOption]) -> list[str]:
        """The kernel's own gdb scripts (lx-dmesg, lx-lsmod, lx-symbols): built by `make all`, not by the targets
        named here, so asked for when the fragment turns them on."""
        return ["scripts_gdb"] if any(o.name == "CONFIG_GDB_SCRIPTS" and o.value == "y" for o in options) else []

    def _gdb_scripts(self, options: list[FragmentOption], built: BuiltKernel) -> None:
        """A cached build from before the scripts were asked for gets them now (seconds), while its tree is there."""
        obj = built.obj_dir
        if self._gdb_targets(options) and obj is not None and (obj / "source").exists() \
                and not (obj / "vmlinux-gdb.py").exists():
            self.progress("kernel: the kernel's gdb scripts (scripts_gdb)")
            self._make((obj / "source").resolve(), obj, ["scripts_gdb"], "gdb scripts", quiet=True)

    def _driver(self, built: BuiltKernel) -> None:
        """The guest driver (guest/driver/) against this build's tree, while the tree is there (a cache that
        keeps the kernel but not the tree keeps the driver built here too)."""
        from .driver_build import build_driver, driver_missing
        from .kernelspec import KernelSpec

        spec = KernelSpec(built.vmlinux, built.modules_dir, built.release, built.config, "built",
                          build_dir=built.obj_dir)
        why = driver_missing(spec, self.root)
        if why is not None:
            self.progress(f"kernel: no guest driver: {why}")
            return
        self.progress(f"kernel: guest driver {build_driver(spec, self.root)}")

    def _unpack(self, deb: DebFile, version: str) -> Path:
        base = self.root / "kbuild" / f"src-{version}"
        marker = base / ".complete"
        if marker.exists():
            trees = [p for p in base.iterdir() if p.is_dir()]
            if len(trees) == 1:
                return trees[0]
        debs = self.root / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        dest = debs / deb.filename
        if not dest.exists() or dest.stat().st_size != deb.size:
            self.progress(f"kernel: downloading {SOURCE_PACKAGE} ({deb.size / 1e6:.0f} MB)")
            download(deb, dest, self.progress)
        self.progress(f"kernel: unpacking the source into {base} (about 15 s)")
        # Older source versions go: each tree is ~1.6 GB.
        for old in (self.root / "kbuild").glob("src-*"):
            if old != base:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        tarball = f"./usr/src/{SOURCE_PACKAGE}.tar.xz"
        script = 'dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" | tar -xJ -C "$3"'
        proc = subprocess.run(["sh", "-c", script, "unpack", str(dest), tarball, str(base)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SetupError(f"unpacking {dest.name} failed: {proc.stderr.strip()[-200:]}")
        trees = [p for p in base.iterdir() if p.is_dir()]
        if len(trees) != 1:
            raise SetupError(f"{dest.name} did not hold one source tree")
        marker.touch()
        return trees[0]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, KBUILD_BUILD_USER="aperture", KBUILD_BUILD_HOST="aperture", LC_ALL="C")
        if shutil.which("ccache"):
            env["CCACHE_DIR"] = str(self.root / "ccache")  # ours, not the user's ~/.ccache
            env["CCACHE_BASEDIR"] = str(self.root / "kbuild")  # relative paths: hits survive a new source dir
            env.setdefault("CCACHE_MAXSIZE", "2G")
        return env

    def _make_argv(self, src: Path, obj: Path, targets: list[str]) -> list[str]:
        argv = ["make", "-C", str(src), f"O={obj}", f"-j{self.jobs}"]
        if shutil.which("ccache"):
            argv.append("CC=ccache gcc")
        return argv + targets

    def _configure(self, src: Path, obj: Path, options: list[FragmentOption]) -> None:
        self.progress("kernel: tinyconfig + fragment, olddefconfig")
        self._make(src, obj, ["tinyconfig"], "configuring", quiet=True)
        config = obj / ".config"
        with open(config, "a") as f:
            f.write("\n# aperture fragment\n" + "".join(o.line + "\n" for o in options))
        self._make(src, obj, ["olddefconfig"], "configuring", quiet=True)
        dropped = dropped_options(options, parse_config(config.read_text()))
        if dropped:
            raise SetupError(f"olddefconfig dropped {len(dropped)} fragment option(s): {', '.join(dropped)} "
                             f"(check their dependencies in {self.fragment or fragment_path()})")

    def _make(self, src: Path, obj: Path, targets: list[str], step: str, quiet: bool = False) -> None:
        """Run make; progress is the elapsed time and the file being built, make's own output only with -v."""
        argv = self._make_argv(src, obj, targets)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env(),
                                text=True, errors="replace")
        assert proc.stdout is not None
        tail: list[str] = []
        progress = _MakeProgress()
        done = threading.Event()
        started = time.monotonic()

        def ticker() -> None:
            while not done.wait(10.0):
                if not quiet and not self.verbose:
                    self.progress(f"kernel: {step} {time.monotonic() - started:4.0f} s, {progress.objects} files, "
                                  f"now {progress.current}")

        thread = threading.Thread(target=ticker, daemon=True)
        thread.start()
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail = (tail + [line])[-30:]
                if self.verbose:
                    self.output(line)
                parts = line.split()
                if len(parts) == 2 and parts[0] in ("CC", "LD", "AR", "AS", "LDS", "OBJCOPY"):
                    progress.step(parts[1])
                elif len(parts) >= 3 and parts[0] == "CC" and parts[1] == "[M]":
                    progress.step(parts[2])
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
        if rc != 0:
            # The first specific complaint is the cause; make's own "Error 2" lines only echo it upwards.
            cause = ([ln for ln in tail if "error:" in ln.lower() or "not found" in ln.lower()]
                     or [ln for ln in tail if "error" in ln.lower()] or tail[-1:] or ["?"])
            raise SetupError(f"kernel build: 'make {' '.join(targets)}' failed (exit {rc}): {cause[0].strip()}")

    def _build_hmm_tests(self, src: Path, obj: Path, dest: Path) -> Path | None:
        """The kernel's own HMM selftest, static, against this tree's UAPI headers (the outside witness)."""
        self._make(src, obj, ["headers_install"], "installing headers", quiet=True)
        test_dir = src / "tools/testing/selftests/mm"
        gcc = shutil.which("gcc") or "gcc"
        # The selftests' own include flags: KHDR_INCLUDES (installed UAPI), TOOLS_INCLUDES, top_srcdir.
        argv = [gcc, "-static", "-O2", "-Wall", "-U_FORTIFY_SOURCE", f"-I{src}", "-isystem", str(obj / "usr/include"),
                "-isystem", str(src / "tools/include/uapi"), "-o", str(dest), str(test_dir / "hmm-tests.c"),
                "-lrt", "-lpthread", "-lm"]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=test_dir)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            self.progress(f"kernel: hmm-tests did not build ({lines[-1] if lines else '?'}); "
                          "witness.hmm_tests will say so")
            return None
        return dest

    def _install(self, src: Path, obj: Path, out: Path, *, key: str, version: str, frag: str, compiler: str,
                 started: float) -> BuiltKernel:
        release = (obj / "include/config/kernel.release").read_text().strip()
        staging = private_tmp(out)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            self.progress("kernel: installing modules and building hmm-tests")
            self._make(src, obj, [f"INSTALL_MOD_PATH={staging / 'root'}", "INSTALL_MOD_STRIP=1", "modules_install"],
                       "installing modules", quiet=True)
            shutil.copy2(obj / "vmlinux", staging / "vmlinux")
            shutil.copy2(obj / "arch/x86/boot/bzImage", staging / "bzImage")
            shutil.copy2(obj / ".config", staging / "config")
            hmm = self._build_hmm_tests(src, obj, staging / "hmm-tests")
            # The build tree's "build"/"source" symlinks point into the object dir: keep them, they are how an
            # out-of-tree module finds its kernel.
            info = {
                "key": key, "release": release, "source_version": version, "fragment_hash": frag,
                "compiler": compiler, "vmlinux": str(out / "vmlinux"), "bzimage": str(out / "bzImage"),
                "config": str(out / "config"), "modules_dir": str(out / "root/lib/modules" / release),
                "hmm_tests": str(out / "hmm-tests") if hmm else None,
                "build_s": round(time.monotonic() - started, 1), "obj_dir": str(obj), "src_dir": str(src),
            }
            (staging / "kernel.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            staging.replace(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return BuiltKernel.from_json(info)

    def _record(self, built: BuiltKernel) -> None:
        manifest = read_manifest(self.root)
        manifest["built_kernel"] = built.to_json()
        write_manifest(manifest, self.root)
        os.utime(built.vmlinux.parent / "kernel.json")  # newest first in cached_builds()

    def _prune(self, keep: int) -> None:
        builds = sorted(kernels_dir(self.root).glob("*/kernel.json"), key=mtime_or_zero, reverse=True)
        for info in builds[keep:]:
            shutil.rmtree(info.parent, ignore_errors=True)
