"""``aperture run [VM options] -- CMD``: boot, set DAX and the devices up as for the built-in checks, run the
user's command in the guest with its output streamed as it comes, and exit with its status."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aperture.emulator.config import VmConfig
from aperture.emulator.runs.kernel_log import kernel_log_check
from aperture.emulator.runs.results import Check, HostVerifier, driver_claims, emulator_thread_check
from aperture.emulator.runs.run import Progress, _verifier, check_helper_abi
from aperture.emulator.vm.warm import BootInputs, ready_vm
from aperture.guest.abi import CheckName, MsgType
from aperture.guest.driver_build import DRIVER_MODULE
from aperture.guest.errors import ConfigError, GuestError

#: Setup checks the idle scenario reports only when something went wrong; a failed share is fatal to the command.
FATAL_SETUP_CHECKS = (CheckName.GUEST_SHARES,)
#: The longest command line the guest's serve loop takes (its buffer is 4 KiB, the JSON around it included).
MAX_COMMAND_BYTES = 3800


@dataclass
class CommandResult:
    """What ``aperture run -- CMD --json`` reports."""

    argv: list[str]
    rc: int
    duration_s: float
    output_bytes: dict[str, int]
    cwd: str | None
    accel: str
    kernel_release: str
    boot_s: float | None
    run_dir: str
    checks: list[Check] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    start: str = "cold"  # "restore": from a warm-start snapshot
    restore_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and all(c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        """The command's status; when it succeeded but a --checks check failed, 1."""
        return self.rc if self.rc != 0 else (0 if self.ok else 1)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["command"] = {"argv": out.pop("argv"), "rc": out.pop("rc"), "duration_s": out.pop("duration_s"),
                          "output_bytes": out.pop("output_bytes"), "cwd": out.pop("cwd")}
        return out


def command_line(argv: tuple[str, ...]) -> str:
    """The words as the guest's shell gets them: quoted, so each word stays one (unlike `exec`, which joins)."""
    line = shlex.join(argv)
    if len(line.encode()) > MAX_COMMAND_BYTES:
        raise ConfigError(f"the command is {len(line.encode())} bytes; at most {MAX_COMMAND_BYTES} "
                          "(put a longer one in a script in a --share directory)")
    return line


def _setup_messages(notes: list[str] | None = None) -> Callable[[dict[str, Any]], None]:
    """What a cold-booted idle guest says before it is ready: the helper's ABI checked, a share that failed to
    mount fatal, its log lines kept in ``notes``."""

    def take(msg: dict[str, Any]) -> None:
        if msg.get("type") == MsgType.HELLO:
            check_helper_abi(msg)
        elif msg.get("type") == MsgType.CHECK and msg.get("name") in FATAL_SETUP_CHECKS and not msg.get("ok"):
            raise GuestError(f"the guest could not mount the shared directories: {msg.get('detail')}")
        elif msg.get("type") == MsgType.LOG and notes is not None:  # (setup's checks come again in --checks)
            notes.append(str(msg.get("message"))[:500])

    return take


def run_command(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, argv: tuple[str, ...],
                *, cwd: str | None, with_checks: bool, on_output: Callable[[str, bytes], None],
                console_sink: Callable[[str], None] | None = None, name: str | None = None,
                cold: bool = False) -> CommandResult:
    line = command_line(argv)
    notes: list[str] = []
    pending: list[Check] = []
    written: list[dict[str, Any]] = []
    with ready_vm(config, inputs, run_dir, progress, cold=cold, name=name, console_sink=console_sink,
                  on_setup=_setup_messages(notes)) as (vm, info):
        verifier: HostVerifier = _verifier(vm, config, inputs.kernel, DRIVER_MODULE in inputs.image.modules)
        if info.note:
            notes.append(f"warm start: {info.note}")
        progress(f"guest ready {info.ready_s or 0:.2f} s after QEMU start ({info.start})")
        if with_checks:
            progress("running the built-in checks")
            done, seen = vm.command({"scenario": "default"}, timeout=config.run_timeout)
            for msg in seen:
                if msg.get("type") == MsgType.CHECK and (check := Check.from_message(msg)) is not None:
                    pending.append(check)
                    written.extend(driver_claims(check))
                elif msg.get("type") == MsgType.WRITTEN and isinstance(msg.get("regions"), list):
                    written.extend(r for r in msg["regions"] if isinstance(r, dict))
        sizes = {"stdout": 0, "stderr": 0}

        def relay(stream: str, data: bytes) -> None:
            sizes[stream if stream in sizes else "stdout"] += len(data)
            on_output(stream, data)

        progress(f"running: {line}" + (f" (in {cwd})" if cwd else ""))
        t0 = time.monotonic()
        rc, _ = vm.exec(line, timeout=config.run_timeout, cwd=cwd, on_output=relay)
        duration = time.monotonic() - t0
        boot_s = info.ready_s
        thread_errors = (vm.service.loop_error_count, list(vm.service.loop_errors)) if vm.service else (0, [])
    checks = [verifier.verify(c, written) for c in pending]
    if thread_errors[0]:
        checks.append(emulator_thread_check(*thread_errors, run_dir))
    # the kernel's own reports: one while the command ran makes a successful command's run exit 1
    checks.append(kernel_log_check(vm.paths.console, inputs.kernel, config.user_modules))
    return CommandResult(list(argv), rc, round(duration, 3), sizes, cwd, inputs.accel.accel, inputs.kernel.release,
                         round(boot_s, 3) if boot_s is not None else None, str(run_dir.resolve()), checks, notes,
                         info.start, info.restore_s)


def run_shell(config: VmConfig, inputs: BootInputs, run_dir: Path, progress: Progress, *,
              console_sink: Callable[[str], None] | None = None, name: str | None = None, cold: bool = False) -> int:
    """``aperture run --shell``: boot, give the terminal a shell in the guest, stop the VM when it exits.
    Returns the shell's exit status (0 when the user detached: the VM stops all the same)."""
    from aperture.emulator.runs.terminal import attach

    with ready_vm(config, inputs, run_dir, progress, cold=cold, name=name, console_sink=console_sink, shell=True,
                  on_setup=_setup_messages()) as (vm, info):
        progress(f"guest ready {info.ready_s or 0:.2f} s after QEMU start ({info.start})")
        assert vm.shell_sock is not None
        progress("guest shell: exit (or Ctrl-] to detach) stops the VM")
        status = attach(vm.shell_sock)
    return 0 if status is None else status
