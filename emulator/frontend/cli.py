"""The ``aperture`` command: parse and validate at the edge, dispatch, map errors to exit codes in one place.

Exit codes: 0 all checks passed · 1 a check failed · 2 usage/configuration · 3 environment (no QEMU, no
kernel, modules mismatch) · 4 guest crashed, hung or QEMU died · 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from aperture.emulator.config import ShareConfig
from aperture.emulator.frontend.summary import print_bench, print_summary
from aperture.emulator.spec import VM_OPTIONS, VmOption, VmOptionError, VmSpec
from aperture.guest.errors import ApertureError, ConfigError, GuestError, SetupError, VmLaunchError
from aperture.guest.units import parse_duration


# ---------------------------------------------------------------------------- shared helpers
class ProgressOutput:
    """Progress to stderr (never stdout, which carries --json), optionally silenced."""

    def __init__(self, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose

    def progress(self, text: str) -> None:
        if not self.quiet:
            click.echo(click.style("» ", fg="cyan") + text, err=True)

    def console(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()


def _parse_option(parse: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that validates with ``parse`` and turns ConfigError into a usage error (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return parse(value)
        except ConfigError as exc:
            raise click.BadParameter(exc.message) from exc

    return callback


_duration = _parse_option(lambda v: None if v is None else parse_duration(v))


def _check_run_dir(value: Path | None) -> Path | None:
    if value is not None and value.exists() and not value.is_dir():
        raise ConfigError(f"--run-dir {value} exists and is not a directory")
    return value


_run_dir = _parse_option(_check_run_dir)


def _click_option(option: VmOption) -> Callable[[Any], Any]:
    """A VM option as a click option: no click default (an option not given takes the spec's), the default
    shown in the help from the one table."""
    shown = option.default if option.default not in (None, (), False) else None
    kind: Any = click.Choice(option.choices) if option.choices else float if isinstance(option.default, float) else None
    flag: dict[str, Any] = {"is_flag": True} if option.is_flag else {"metavar": option.metavar, "type": kind}
    if option.flag_value is not None:  # `--gdb` alone, or `--gdb wait`: a value that may be left out
        flag.update(is_flag=False, flag_value=option.flag_value)
    return click.option(option.flag, option.name, multiple=option.multiple, **flag,
                        help=option.help + (f"  [default: {shown}]" if shown is not None else ""))


def vm_options(f: Any) -> Any:
    """Every VM option (spec.py VM_OPTIONS) and -q on a command that boots a VM; the command gets them as one
    ``spec: VmSpec`` (and ``quiet``). A bad value is a one-line error naming the flag (exit 2)."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        given = {o.name: kwargs.pop(o.name) for o in VM_OPTIONS}
        # not given: None (a value), () (repeatable) or False (a flag); 0 is a value
        given = {k: v for k, v in given.items() if v is not None and v != () and v is not False}
        return f(*args, spec=VmSpec.from_options(given), **kwargs)

    for option in reversed(VM_OPTIONS):
        command = _click_option(option)(command)
    return click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")(command)


def print_report(report: dict[str, dict[str, Any]]) -> None:
    """Sections of ``key value`` lines; a nested mapping (e.g. config flags) is laid out on a few lines."""
    for section, items in report.items():
        click.echo(click.style(section, bold=True))
        for key, value in items.items():
            if isinstance(value, dict):
                pairs = [f"{k}={v}" for k, v in value.items()]
                click.echo(f"  {key:<28} " + "\n  {:<28} ".format("").join(
                    " ".join(pairs[i:i + 5]) for i in range(0, len(pairs), 5)))
            elif isinstance(value, list):
                click.echo(f"  {key:<28} " + ("\n  {:<28} ".format("")).join(str(v) for v in value))
            else:
                click.echo(f"  {key:<28} {value}")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False))


# ---------------------------------------------------------------------------- commands
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aperture")
def cli() -> None:
    """aperture: boot real Linux test VMs with emulated NVDIMMs and windowed-BAR devices, and report checks.

    \b
    Start with:  aperture doctor     (what this machine has)
                 aperture run        (boot the default VM and print its checks)
    """


#: `git bisect run` reads exit codes: 0 good, 1-127 bad except 125 (cannot test), 128 and more abort the bisect.
BISECT_SKIP = 125
BISECT_ABORT = 128


def bisect_codes(f: Any) -> Any:
    """``--bisect``: exit codes for ``git bisect run`` — 0 every check passed, 1 a check failed, 125 the kernel
    could not be set up, booted or run (any error of aperture's: a missing kernel, a build that failed, a panic,
    a hang), 128 (abort) for an internal error."""

    @functools.wraps(f)
    def command(*args: Any, bisect: bool = False, **kwargs: Any) -> Any:
        if not bisect:
            return f(*args, **kwargs)
        try:
            return f(*args, **kwargs)
        except ApertureError as exc:
            code = BISECT_ABORT if exc.exit_code == 70 else BISECT_SKIP
            click.echo(f"aperture: error: {exc.one_line()} (--bisect: exit {code}, "
                       f"{'cannot test this commit' if code == BISECT_SKIP else 'abort'})", err=True)
            sys.exit(code)

    return click.option("--bisect", is_flag=True, help="Exit codes for `git bisect run`: 0 all checks passed, 1 a "
                        "check failed, 125 the kernel could not be set up, booted or run (skip this commit).")(command)


@cli.command()
@bisect_codes
@vm_options
@click.option("--run-dir", type=click.Path(path_type=Path), callback=_run_dir,
              help="Where backing files and logs go; reuse one to keep NVDIMM contents across runs.")
@click.option("--cwd", "share_cwd", is_flag=True, help="With -- CMD: share the current directory read-write at "
              "the same path and run CMD there.")
@click.option("--checks", "with_checks", is_flag=True, help="With -- CMD: run the built-in checks first.")
@click.option("--shell", "give_shell", is_flag=True, help="Boot, attach this terminal to a shell in the guest, "
              "stop the VM when the shell exits (Ctrl-] detaches, which stops it too).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--reboot", is_flag=True, help="Boot twice in the same run dir; the second boot checks that the "
              "first boot's DAX data persisted (dax.persistence).")
@click.option("--remap-every", callback=_duration, metavar="DURATION",
              help="Run the window workload instead of the default checks, while the host remaps random slots "
              "every DURATION (e.g. 20ms).")
@click.option("--remap-mode", type=click.Choice(["pause", "hotplug"]), default="pause", show_default=True,
              help="pause: stop, retarget slots, cont. hotplug: re-plug the window at a new device-memory offset.")
@click.option("--duration", callback=_duration, default="10s", show_default=True,
              metavar="DURATION",
              help="How long the remap workload (or the fuzzer) runs.")
@click.option("--fuzz", is_flag=True, help="Run the hostile-guest fuzzer (random registers, ring indices, "
              "descriptors, doorbells, results-channel garbage) for --duration instead of the default checks; "
              "with --remap-every the host remaps meanwhile (aperture.fuzz).")
@click.option("--cold", is_flag=True, help="Boot the guest instead of restoring the warm-start snapshot of this "
              "VM (and make none). Without it a matching snapshot is restored, made first if there is none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the documented contract).")
@click.option("--junit-xml", type=click.Path(path_type=Path, dir_okay=False), help="Also write the checks as "
              "JUnit XML (one testcase per check) for CI systems.")
@click.option("--ktap", "ktap_path", type=click.Path(path_type=Path, dir_okay=False), help="Also write the checks "
              "as KTAP version 1 (as the kernel's selftests print it; `kunit.py parse` reads it).")
@click.option("--only", multiple=True, metavar="GLOB", help="Run only the checks whose names match (repeatable), "
              "e.g. --only 'dax.*'; fixtures no selected check needs are not set up.")
@click.option("--skip", multiple=True, metavar="GLOB", help="Do not run the checks whose names match (repeatable).")
@click.option("--skip-unsupported", is_flag=True, help="With --kernel DIR: run a tree whose config lacks options some "
              "checks need, and report exactly those checks as skipped, with the options they lack (else such a "
              "tree is refused in one line).")
@click.option("-v", "--verbose", is_flag=True, help="Stream the guest console (full kernel log) to stderr.")
def run(spec: VmSpec, quiet: bool, run_dir: Path | None, share_cwd: bool, with_checks: bool, give_shell: bool,
        command: tuple[str, ...], reboot: bool, remap_every: float | None, remap_mode: str, duration: float,
        fuzz: bool, cold: bool, as_json: bool, junit_xml: Path | None, ktap_path: Path | None,
        only: tuple[str, ...], skip: tuple[str, ...], skip_unsupported: bool, verbose: bool) -> None:
    """Start the default VM, run the guest checks, print the results.

    Exit 0 when every check passed, 1 when one failed.

    \b
    With -- CMD [ARG...]: boot, set DAX and the devices up as for the checks, run CMD in the guest (busybox sh,
    host binaries from --share/--cwd directories run too), stream its output, exit with its status (128+N
    for a signal). The built-in checks run only with --checks.
      aperture run --cwd -- sh -c './prog && ./check.sh'
      aperture run --share ~/tests:/tests:ro -- /tests/run.sh
    """
    from aperture.emulator.runpaths import new_run_name
    from aperture.emulator.runs.run import (
        default_run_dir,
        plan_workload,
        prepare,
        prepare_inputs,
        refuse_or_skip,
        run_vm,
    )
    from aperture.emulator.selection import CheckSelection

    ui = ProgressOutput(quiet, verbose)
    if verbose and not any(a.startswith("loglevel=") for a in spec.config.kernel_cmdline_extra):
        # the whole kernel log on the streamed console (default: quiet)
        spec = spec.replace(kernel_cmdline_extra=spec.config.kernel_cmdline_extra + ("loglevel=7",))
    cwd = None
    if share_cwd:
        if not command and not give_shell:
            raise ConfigError("--cwd needs a command (aperture run --cwd -- CMD) or --shell")
        here = ShareConfig.parse(os.getcwd())
        cwd = here.guest
        spec = spec.replace(shares=tuple(s for s in spec.config.shares if s.guest != here.guest) + (here,))
    if with_checks and not command:
        raise ConfigError("--checks goes with a command: aperture run --checks -- CMD")
    if command and (reboot or remap_every is not None or fuzz or junit_xml or ktap_path or only or skip):
        raise ConfigError("-- CMD cannot be combined with --reboot, --remap-every, --fuzz, --junit-xml, --ktap, "
                          "--only or --skip")
    selection = CheckSelection(only, skip)
    if give_shell:
        if command or with_checks or reboot or remap_every is not None or fuzz or as_json:
            raise ConfigError("--shell takes VM options only (no command, --checks, --json, --reboot, --remap-every "
                              "or --fuzz)")
        from aperture.emulator.runs.oneshot import run_shell

        inputs = prepare(spec, ui.progress)
        name = new_run_name()
        sys.exit(run_shell(spec.config, inputs, run_dir or default_run_dir(name), ui.progress, name=name,
                           cold=cold))
    if command:
        _run_command(spec, run_dir, ui, command, cwd, with_checks, as_json, verbose, cold)
    spec, remap = plan_workload(spec, remap_every=remap_every, remap_mode=remap_mode, duration=duration, fuzz=fuzz,
                                reboot=reboot)
    kernel = spec.resolve_kernel()  # once: resolving a built kernel runs gcc --version, a tree reads its files
    selection, unsupported = refuse_or_skip(kernel, skip_unsupported, selection)
    inputs = prepare_inputs(spec.config, kernel, ui.progress)
    if remap is not None and remap.mode == "hotplug":
        from aperture.qmp_client.qemu import require_hotplug

        require_hotplug(inputs.qemu)
    name = new_run_name()
    result = run_vm(spec.config, inputs, run_dir or default_run_dir(name), ui.progress, name=name, reboot=reboot,
                    console_sink=ui.console if verbose else None, remap=remap, fuzz=duration if fuzz else None,
                    cold=cold, selection=selection)
    result.checks += unsupported  # a kernel tree's checks its config cannot run: skips, with the reason
    if junit_xml is not None:
        from aperture.emulator.runs.results import junit_xml as to_junit

        junit_xml.write_text(to_junit(result))
    if ktap_path is not None:
        from aperture.emulator.runs.results import ktap

        ktap_path.write_text(ktap(result.checks))
    if as_json:
        emit_json(result.to_json())
    else:
        print_summary(result)
    sys.exit(result.exit_code)


def _run_command(spec: VmSpec, run_dir: Path | None, ui: ProgressOutput, command: tuple[str, ...], cwd: str | None,
                 with_checks: bool, as_json: bool, verbose: bool, cold: bool) -> None:
    """`aperture run -- CMD`: the command's output as it comes (to stderr under --json), its status as ours."""
    from aperture.emulator.runpaths import new_run_name
    from aperture.emulator.runs.oneshot import command_line, run_command
    from aperture.emulator.runs.run import default_run_dir, prepare

    command_line(command)  # too long: refused before anything boots
    inputs = prepare(spec, ui.progress)
    name = new_run_name()
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def write(stream: str, data: bytes) -> None:
        target = err if as_json or stream == "stderr" else out
        target.write(data)
        target.flush()

    result = run_command(spec.config, inputs, run_dir or default_run_dir(name), ui.progress, command, cwd=cwd,
                         with_checks=with_checks, on_output=write, console_sink=ui.console if verbose else None,
                         name=name, cold=cold)
    if as_json:
        emit_json(result.to_json())
    else:
        for check in result.checks:
            if not check.ok:
                click.echo(f"aperture: check FAILED: {check.name}", err=True)
        if with_checks:
            passed = sum(c.ok for c in result.checks)
            ui.progress(f"checks: {passed}/{len(result.checks)} passed")
        ui.progress(f"command exited with status {result.rc} after {result.duration_s:.2f} s")
    sys.exit(result.exit_code)


@cli.command()
@click.option("--release", help="Debian suite to take the kernel from (e.g. bookworm-backports).")
def fetch(release: str | None) -> None:
    """Download the guest kernel and busybox packages into the cache (no host install)."""
    from aperture.guest.debian import fetch_guest_packages

    manifest = fetch_guest_packages(release, progress=ProgressOutput().progress)
    ProgressOutput().progress(f"kernel {manifest['kernel']['release']}, busybox {manifest['busybox']}")


@cli.group()
def kernel() -> None:
    """The guest kernel built for the job (Debian's linux-source + guest/kconfig/aperture.config)."""


@kernel.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds a build for this key.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), help="Parallel make jobs (default: all cores).")
@click.option("-v", "--verbose", is_flag=True, help="Stream make's own output.")
@click.option("--flavor", type=click.Choice(["default", "debug"]), default="default", show_default=True,
              help="debug: the fragment plus KASAN, lockdep, DEBUG_VM, DEBUG_ATOMIC_SLEEP, DEBUG_LIST and debug info "
              "(guest/kconfig/debug.config); run it with --kernel built-debug.")
@click.option("--json", "as_json", is_flag=True, help="Print what was built (or found) as JSON.")
def kernel_build(force: bool, jobs: int | None, verbose: bool, flavor: str, as_json: bool) -> None:
    """Fetch the source into the cache, configure, build and cache the guest kernel (idempotent).

    Rebuilt only when the source version, the fragment or the compiler changes. A fragment option that
    olddefconfig drops stops the build with its name (exit 3).
    """
    from aperture.guest.kbuild import KernelBuilder

    ui = ProgressOutput()
    built = KernelBuilder(ui.progress, verbose=verbose, jobs=jobs, output=lambda line: click.echo(line, err=True),
                          flavor=flavor).build(force=force)
    if as_json:
        emit_json(built.to_json())
    else:
        click.echo(f"kernel {built.release}: {built.vmlinux}")


@kernel.command("fragment")
def kernel_fragment() -> None:
    """The kernel options aperture's checks need, with the reason for each, for your own tree:

    \b
      aperture kernel fragment > aperture.config
      scripts/kconfig/merge_config.sh -O BUILD .config aperture.config   # in the kernel source
      make O=BUILD olddefconfig && make O=BUILD -j$(nproc)
      aperture run --kernel BUILD
    """
    from aperture.guest.kbuild import fragment_path, read_fragment

    click.echo(f"# aperture's kernel options (from {fragment_path().name}); merge with scripts/kconfig/merge_config.sh")
    for option in read_fragment():
        click.echo(f"# {option.why}\n{option.name}={option.value}")


@kernel.command("check")
@click.argument("target", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True)
def kernel_check(target: Path, as_json: bool) -> None:
    """Which of the default run's checks a kernel can run: TARGET is a kernel build tree or a .config file.
    Exit 0 when every check can run, 1 when some would skip (each says which options it lacks)."""
    from aperture.emulator.runs.results import checks_a_config_runs
    from aperture.guest.kbuild import parse_config

    config = target / ".config" if target.is_dir() else target
    if not config.is_file():
        raise ConfigError(f"{target} is neither a kernel build tree (no .config) nor a config file")
    missing = checks_a_config_runs(parse_config(config.read_text(errors="replace")))
    lacking = sorted({opt for opts in missing.values() for opt in opts})
    if as_json:
        emit_json({"config": str(config), "checks": {name: {"runs": not opts, "lacks": opts}
                                                      for name, opts in missing.items()},
                   "lacks": lacking})
    else:
        for name, opts in missing.items():
            mark = click.style("runs ", fg="green") if not opts else click.style("skips", fg="yellow")
            click.echo(f"  {mark} {name:<26} {'lacks ' + ', '.join('CONFIG_' + o for o in opts) if opts else ''}")
        if lacking:
            click.echo(f"turn on: {' '.join('CONFIG_' + o for o in lacking)} (aperture kernel fragment lists "
                       "every option aperture uses, with its reason)")
    sys.exit(1 if lacking else 0)


@kernel.command("info")
@click.option("--json", "as_json", is_flag=True)
def kernel_info(as_json: bool) -> None:
    """What the cache holds: built kernels (the current one marked), and Debian's prebuilt kernel."""
    from aperture.emulator.frontend.doctor import kernels_report

    report = kernels_report()
    if as_json:
        emit_json(report)
        return
    print_report(report)


@cli.group()
def image() -> None:
    """Build or inspect the guest initramfs (cached by a hash of its inputs)."""


def kernel_options(f: Any) -> Any:
    """The kernel-choice rows of VM_OPTIONS (--kernel, --modules, --config); the command gets a ``spec``."""
    kernel_rows = [o for o in VM_OPTIONS if o.target == "kernel"]

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        given = {o.name: kwargs.pop(o.name) for o in kernel_rows if kwargs.get(o.name) is not None}
        for o in kernel_rows:
            kwargs.pop(o.name, None)
        return f(*args, spec=VmSpec.from_options(given), **kwargs)

    for option in reversed(kernel_rows):
        command = _click_option(option)(command)
    return command


@image.command("build")
@kernel_options
@click.option("--force", is_flag=True, help="Rebuild even if a cached image matches.")
@click.option("--json", "as_json", is_flag=True)
def image_build(spec: VmSpec, force: bool, as_json: bool) -> None:
    """Build the guest image for a kernel."""
    from aperture.guest.image import build_image

    img = build_image(spec.resolve_kernel(), force=force)
    if as_json:
        emit_json(img.to_json())
    else:
        click.echo(f"{img.path} ({img.path.stat().st_size / 1e6:.1f} MB, {'cached' if img.cached else 'built'})")
        click.echo(f"  kernel {img.kernel_release}; modules: {' '.join(img.modules)}")


@image.command("info")
@kernel_options
@click.option("--json", "as_json", is_flag=True)
def image_info(spec: VmSpec, as_json: bool) -> None:
    """Show the image for a kernel and what it contains (builds it if needed)."""
    from aperture.guest.cpio import read_cpio
    from aperture.guest.image import build_image

    img = build_image(spec.resolve_kernel())
    entries = read_cpio(img.path.read_bytes())
    if as_json:
        emit_json(dict(img.to_json(), entries=[{"name": e.name, "mode": oct(e.mode), "size": len(e.data)}
                                               for e in entries]))
        return
    click.echo(f"{img.path}  digest {img.digest}  kernel {img.kernel_release}")
    for e in entries:
        click.echo(f"  {oct(e.mode):>9}  {len(e.data):>9}  {e.name}")


@cli.group()
def snapshot() -> None:
    """Warm-start snapshots: a VM saved at its ready state, restored by run, up and the pytest fixture."""


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True)
def snapshot_ls(as_json: bool) -> None:
    """List the snapshots in the cache (newest use first), whether each is usable, and their size on disk."""
    from aperture.emulator.vm.snapshots import list_snapshots, snapshots_dir
    from aperture.guest.units import format_size

    snaps = list_snapshots()
    if as_json:
        emit_json({"dir": str(snapshots_dir()), "snapshots": snaps})
        return
    if not snaps:
        click.echo(f"no snapshots in {snapshots_dir()} (the first run of a VM makes one)")
        return
    click.echo(f"{'KEY':<22} {'OK':<4} {'ON DISK':>8}  {'KERNEL':<10} {'QEMU':<8} {'ACCEL':<5} MADE")
    for sn in snaps:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(sn["created"])) if sn["created"] else "?"
        click.echo(f"{sn['key']:<22} {'yes' if sn['ok'] else 'no':<4} {format_size(sn['allocated_bytes']):>8}  "
                   f"{sn['kernel_release'] or '?':<10} {sn['qemu_version'] or '?':<8} {sn['accel'] or '?':<5} {made}"
                   + (f"  ({sn['why']})" if sn["why"] else ""))


@snapshot.command("rm")
@click.option("--all", "all_", is_flag=True, required=True, help="Remove every snapshot (the next run makes one).")
def snapshot_rm(all_: bool) -> None:
    """Remove snapshots from the cache."""
    from aperture.emulator.vm.snapshots import remove_snapshots

    click.echo(f"removed {remove_snapshots()} snapshot(s)")


@cli.command()
@click.option("--probe", is_flag=True, help="Run the KVM probe boot now if no verdict is cached.")
@click.option("--json", "as_json", is_flag=True)
def doctor(probe: bool, as_json: bool) -> None:
    """What this machine has: QEMU and its features, accelerator verdict, cache, kernel config."""
    from aperture.emulator.frontend.doctor import diagnose

    report = diagnose(probe=probe, progress=ProgressOutput().progress)
    if as_json:
        emit_json(report)
        return
    print_report(report)


@cli.group()
def bench() -> None:
    """Benchmarks. Each prints `figures` and `ratios` (ratios against a baseline measured in the same run)."""


def _run_bench(spec: VmSpec, quiet: bool, as_json: bool,
               measure: Callable[[Any, Any, Callable[[str], None]], dict[str, Any]]) -> dict[str, Any]:
    """Every bench: measure on the spec's VM and kernel, print figures and same-run ratios (or JSON)."""
    report = measure(spec.config, spec.resolve_kernel(), ProgressOutput(quiet).progress)
    print_bench(report, as_json)
    return report


@bench.command("boot")
@vm_options
@click.option("-n", "--boots", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_boot(spec: VmSpec, quiet: bool, boots: int, as_json: bool) -> None:
    """Cold boots: time to the helper's first message and to poweroff (bzImage, and PVH vmlinux if possible)."""
    from aperture.emulator.frontend import bench as benches

    _run_bench(spec, quiet, as_json,
               lambda config, kernel, progress: benches.bench_boot(config, kernel, boots, progress))


@bench.command("dax")
@vm_options
@click.option("--json", "as_json", is_flag=True)
def bench_dax_cmd(spec: VmSpec, quiet: bool, as_json: bool) -> None:
    """Guest memcpy bandwidth into devdax and fsdax mappings, as ratios of memcpy into anonymous RAM."""
    from aperture.emulator.frontend import bench as benches

    _run_bench(spec, quiet, as_json, benches.bench_dax)


@bench.command("share")
@vm_options
@click.option("--mib", type=click.IntRange(16, 4096), default=256, show_default=True, help="Size of the file read.")
@click.option("--files", type=click.IntRange(100, 100_000), default=10_000, show_default=True,
              help="Small files for find + stat.")
@click.option("--json", "as_json", is_flag=True)
def bench_share_cmd(spec: VmSpec, quiet: bool, mib: int, files: int, as_json: bool) -> None:
    """--share (9p): a sequential read and find + stat over many small files, as ratios of the same on the
    guest's RAM-backed root."""
    from aperture.emulator.frontend import bench as benches

    _run_bench(spec, quiet, as_json,
               lambda config, kernel, progress: benches.bench_share(config, kernel, progress, mib, files))


@bench.command("device")
@vm_options
@click.option("--json", "as_json", is_flag=True)
def bench_device_cmd(spec: VmSpec, quiet: bool, as_json: bool) -> None:
    """MAP round trip vs its host floor, DMA throughput vs host memcpy (4 KiB and 2 MiB), same run."""
    from aperture.emulator.frontend import bench as benches

    _run_bench(spec, quiet, as_json, benches.bench_device)


@bench.command("driver")
@vm_options
@click.option("--json", "as_json", is_flag=True)
def bench_driver_cmd(spec: VmSpec, quiet: bool, as_json: bool) -> None:
    """The guest driver: migration and fault-back MB/s vs host memcpy, peer-map latency vs the MAP floor."""
    from aperture.emulator.frontend import bench as benches

    _run_bench(spec, quiet, as_json, benches.bench_driver)


@bench.command("soak")
@vm_options
@click.option("--duration", callback=_duration, default="10m", show_default=True, metavar="DURATION",
              help="How long the fuzzer and the remaps run.")
@click.option("--json", "as_json", is_flag=True)
def bench_soak_cmd(spec: VmSpec, quiet: bool, duration: float, as_json: bool) -> None:
    """The hostile-guest fuzzer plus host remaps every 20 ms for DURATION; this process's memory must stay contiguous
    (ratio: last quarter vs first quarter of the same run). Exit 1 if the fuzz check failed."""
    from aperture.emulator.frontend import bench as benches

    report = _run_bench(spec, quiet, as_json,
                        lambda config, kernel, progress: benches.bench_soak(config, kernel, duration, progress))
    sys.exit(0 if report["ok"] else 1)


@bench.command("remap")
@vm_options
@click.option("-n", "--rounds", type=click.IntRange(10, 5000), default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_remap_cmd(spec: VmSpec, quiet: bool, rounds: int, as_json: bool) -> None:
    """Pause-mode remap latency vs bare QMP stop+cont, same VM, same run."""
    from aperture.emulator.frontend import bench as benches

    _run_bench(spec, quiet, as_json,
               lambda config, kernel, progress: benches.bench_remap(config, kernel, progress, rounds))


@cli.command()
@click.argument("name", default="default")
@vm_options
@click.option("--run-dir", type=click.Path(path_type=Path), callback=_run_dir,
              help="Default: a directory named after the VM, so device memory and NVDIMM contents carry over "
              "between up/down cycles.")
@click.option("--cold", is_flag=True, help="Boot the guest instead of restoring this VM's warm-start snapshot.")
def up(name: str, spec: VmSpec, quiet: bool, run_dir: Path | None, cold: bool) -> None:
    """Start a VM (QEMU + device model) in the background and return once the guest is ready.

    The VM is restored from its warm-start snapshot (made the first time) unless --cold, --share, or its run
    dir already holds NVDIMM contents (a restore would replace them)."""
    from aperture.emulator.daemon.lifecycle import up as start
    from aperture.emulator.daemon.registry import check_name
    from aperture.emulator.runs.run import default_run_dir, prepare

    ui = ProgressOutput(quiet)
    check_name(name)
    inputs = prepare(spec, ui.progress)
    rec = start(name, spec.config, inputs, run_dir or default_run_dir(name), ui.progress, cold=cold)
    click.echo(f"{name} is up: daemon pid {rec.pid}, QEMU pid {rec.qemu_pid}, {rec.accel}, run dir {rec.run_dir}")
    click.echo(f"  aperture qmp {name}    aperture console {name}    aperture down {name}")


@cli.command("ls")
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(as_json: bool) -> None:
    """List the VMs started with 'aperture up'."""
    from aperture.emulator.daemon.registry import list_records

    recs = list_records()
    if as_json:
        emit_json([dict(dataclasses.asdict(r), uptime_s=round(r.uptime_s, 1)) for r in recs])
        return
    if not recs:
        click.echo("no VMs are up")
        return
    click.echo(f"{'NAME':<16} {'PID':>7} {'ACCEL':<5} {'STATE':<8} {'UPTIME':>8}  RUN DIR")
    for r in recs:
        click.echo(f"{r.name:<16} {r.pid:>7} {r.accel:<5} {r.state:<8} {r.uptime_s:>7.0f}s  {r.run_dir}")


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every VM that is up.")
def down(names: tuple[str, ...], all_: bool) -> None:
    """Shut VMs down cleanly (QMP quit; killed after a timeout). Device memory stays in the run dir."""
    from aperture.emulator.daemon.lifecycle import down as stop
    from aperture.emulator.daemon.registry import list_records

    targets = [r.name for r in list_records()] if all_ else list(names)
    if not targets:
        raise ConfigError("name a VM (see 'aperture ls') or pass --all")
    outcomes = {n: stop(n) for n in targets}
    missing = [n for n, outcome in outcomes.items() if outcome == "not up"]
    for n, outcome in outcomes.items():
        if outcome == "down":
            click.echo(f"{n} is down")
        elif outcome == "reaped":
            click.echo(f"{n} is down (its daemon had died; removed what it left: QEMU, shm files, sockets)")
    if missing:
        raise ConfigError(f"not up: {', '.join(missing)}")


@cli.command()
@click.argument("name", default="default")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the VM stops (Ctrl-C to leave).")
def console(name: str, follow: bool) -> None:
    """Show a running VM's serial console."""
    from aperture.emulator.daemon.lifecycle import follow_console

    rec = _record(name)
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    follow_console(rec, follow, write)


@cli.command()
@click.argument("name", default="default")
@click.option("--json", "as_json", is_flag=True, help="Print each reply as one JSON line.")
def qmp(name: str, as_json: bool) -> None:
    """A QMP shell on a running VM, with window/memmap/dma/remap commands. Reads a terminal or stdin."""
    from aperture.emulator.daemon.control import call
    from aperture.emulator.daemon.registry import state_dir
    from aperture.qmp_client.shell import QmpShell, ShellTarget

    rec = _record(name)
    target = ShellTarget(rec.name, rec.qemu_pid, rec.qmp_socket, functools.partial(call, rec.control_socket),
                         history=state_dir().parent / "qmp_history")
    shell = QmpShell(target, as_json=as_json)
    sys.exit(shell.loop(sys.stdin))


@cli.command("gdb", context_settings={"ignore_unknown_options": True})
@click.argument("name", default="default")
@click.argument("gdb_args", nargs=-1, type=click.UNPROCESSED)
def gdb_cmd(name: str, gdb_args: tuple[str, ...]) -> None:
    """gdb attached to a VM started with --gdb (`aperture up NAME --gdb`), with the guest kernel's vmlinux and,
    where the kernel has them (the debug flavour), the kernel's own gdb scripts: lx-dmesg, lx-lsmod, and
    lx-symbols for aperture's driver and your modules. Arguments after -- go to gdb:

    \b
      aperture gdb dev -- -batch -ex lx-lsmod
    """
    import shutil as _shutil

    from aperture.emulator.runpaths import default_sock_dir
    from aperture.guest.kernelspec import KernelSpec

    rec = _record(name)
    sock = default_sock_dir(name) / "gdb.sock"
    if not sock.exists():
        raise ConfigError(f"{name} has no gdbstub: start it with `aperture up {name} --gdb`")
    gdb = _shutil.which("gdb")
    if gdb is None:
        raise SetupError("gdb not found: run scripts/setup.sh (it installs gdb)")
    spec = json.loads((Path(rec.run_dir) / "daemon-spec.json").read_text())
    kernel = KernelSpec.from_dict(spec["kernel"])
    tree = kernel.build_dir
    vmlinux = kernel.image if kernel.image.name.startswith("vmlinux") else (tree / "vmlinux" if tree else None)
    argv = [gdb, "-q"] + ([str(vmlinux)] if vmlinux and vmlinux.is_file() else [])
    scripts = tree / "vmlinux-gdb.py" if tree else None
    if scripts is not None and scripts.is_file():
        argv += ["-ex", f"add-auto-load-safe-path {tree}", "-ex", f"source {scripts}"]
    argv += ["-ex", f"target remote {sock}"]
    if scripts is not None and scripts.is_file():
        from aperture.guest.driver_build import driver_path

        dirs = [str(driver_path(kernel).parent)] + ([str(kernel.modules_dir)] if kernel.modules_dir else [])
        argv += ["-ex", "lx-symbols " + " ".join(dirs)]
    os.execv(gdb, argv + list(gdb_args))


@cli.command("shell")
@click.argument("name", default="default")
def shell_cmd(name: str) -> None:
    """Attach this terminal to a shell in a running VM's guest (a pseudo-terminal: job control, Ctrl-C goes to
    the guest's foreground job, window size follows). Ctrl-] detaches and leaves the VM running; `exit` ends the
    shell (the VM stays up). Exits with the shell's status."""
    import socket

    from aperture.emulator.runs.terminal import attach

    rec = _record(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(rec.shell_socket)
    except OSError as exc:
        raise ConfigError(f"{name} has no guest shell port ({exc.strerror}); was it started by this aperture?") \
            from exc
    with sock:
        status = attach(sock)
    if status is None:
        click.echo(f"\r\ndetached; {name} is still up (aperture shell {name} to attach again)", err=True)
        sys.exit(0)
    sys.exit(status)


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=click.FloatRange(1, 3600), default=120.0, show_default=True,
              help="Seconds the command may run.")
@click.option("--json", "as_json", is_flag=True, help='Print {"rc": N, "output": "..."} instead.')
def exec_cmd(name: str, command: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Run a shell command in a running VM's guest and exit with its status.

    The words are joined with spaces and run by the guest's busybox sh (as ssh does), with the
    aperture-helper tools on PATH:

    \b
      aperture exec NAME -- 'dmesg | tail'
      aperture exec NAME -- aperture-helper map 0 1 5
    """
    from aperture.emulator.daemon.control import call

    rec = _record(name)
    result = call(rec.control_socket, "exec", timeout=timeout + 10, command=" ".join(command), timeout_s=timeout)
    if as_json:
        emit_json(result)
    else:
        sys.stdout.write(str(result.get("output", "")))
        sys.stdout.flush()
    rc = result.get("rc")
    if not isinstance(rc, int) or isinstance(rc, bool) or not 0 <= rc <= 255:
        # a shell's status is 0-255: anything else is the guest's helper misbehaving (exit 4), said as such
        raise GuestError(f"the guest reported an exit status of {str(rc)[:40]!r}, not 0-255")
    sys.exit(rc)


def _record(name: str) -> Any:
    from aperture.emulator.daemon.registry import read_record

    rec = read_record(name)
    if rec is None or not rec.alive():
        raise ConfigError(f"no VM named {name!r} is up (see 'aperture ls')")
    return rec


# ---------------------------------------------------------------------------- entry point
def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure becomes one line on stderr and a meaningful exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    debug = bool(os.environ.get("APERTURE_DEBUG"))
    try:
        cli.main(args=argv, prog_name="aperture", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"aperture: error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("aperture: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"aperture: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except VmOptionError as exc:  # the library names no flag: the CLI says which one
        click.echo(f"aperture: error: {exc.option.flag}: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except ApertureError as exc:
        click.echo(f"aperture: error: {exc.one_line()}", err=True)
        if isinstance(exc, VmLaunchError) and debug:
            click.echo(exc.details(), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("aperture: interrupted; VM stopped and cleaned up", err=True)
        sys.exit(130)
    except (subprocess.SubprocessError, OSError) as exc:
        click.echo(f"aperture: error: {exc}", err=True)
        sys.exit(3)
    except Exception as exc:  # noqa: BLE001 - last line of defence: no tracebacks for users
        if debug:
            raise
        click.echo(f"aperture: internal error: {type(exc).__name__}: {exc} (set APERTURE_DEBUG=1 for a "
                   "traceback)", err=True)
        sys.exit(70)
