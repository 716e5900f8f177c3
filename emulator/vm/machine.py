"""``Vm``: the lifecycle of one QEMU process with its run directory, backing files, device model and channels.

In the spirit of QEMU's ``QEMUMachine``: a context manager; a launch failure raises one error carrying the
exit code, the command line and QEMU's output; everything the run creates is registered with ``_cleanup`` (an
ExitStack) *before* it is created, and ``shutdown`` (the one place cleanup lives) runs on success, failure and
Ctrl-C. The command line is built in qemu_argv.py, paths in runpaths.py, the channels are read in channels.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aperture.emulator.config import PROBE_BAR_SIZE, VmConfig
from aperture.emulator.model.service import DeviceService
from aperture.emulator.processes import die_with_parent
from aperture.emulator.runpaths import RunPaths, default_sock_dir, new_run_name, persistent_file
from aperture.emulator.vm.channels import ConsoleLog, ResultsChannel
from aperture.emulator.vm.qemu_argv import build_argv, kernel_cmdline
from aperture.guest.abi import MsgType, Phase
from aperture.guest.errors import GuestError, SetupError, VmLaunchError
from aperture.guest.kernelspec import KernelSpec
from aperture.guest.units import MiB, format_size
from aperture.qmp_client.qemu import find_qemu
from aperture.qmp_client.session import SyncQmpSession
from aperture.qmp_client.snapshot import load_state

#: How much of a streamed command's output the guest sends (its serve loop's upper limit); kept output: 1 MiB.
STREAMED_OUTPUT_MAX = 32 << 20
#: What the host keeps of a command's output it returns whole (exec): the first and the last this many bytes. A
#: guest process can write any amount into its own command's output; the host never holds more than twice this.
EXEC_KEPT_BYTES = 1 << 20


class BoundedOutput:
    """The first and last ``keep`` bytes of a stream, and how many in between were dropped."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail += data
        if len(self.tail) > self.keep:
            cut = len(self.tail) - self.keep
            self.dropped += cut
            del self.tail[:cut]

    def text(self) -> str:
        marker = f"\n[aperture: {self.dropped} bytes of output dropped here]\n".encode() if self.dropped else b""
        return (bytes(self.head) + marker + bytes(self.tail)).decode("utf-8", "replace")


@dataclass(frozen=True)
class VmBoot:
    """What a VM boots: its kernel, its initramfs, the QEMU binary (None: find it) and the accelerator."""

    kernel: KernelSpec
    initrd: Path
    qemu: str | None = None
    accel: str = "tcg"


class Vm:
    """A VM: ``with Vm(config, boot, run_dir=...) as vm: for msg in vm.messages(): ...``."""

    def __init__(self, config: VmConfig, boot: VmBoot, *, run_dir: Path, scenario: str = "default",
                 name: str | None = None, console_sink: Callable[[str], None] | None = None,
                 guest_env: dict[str, str] | None = None, user_qmp: bool = False, shell: bool = False,
                 plug_nvme: bool = True, incoming: Path | None = None) -> None:
        self.config = config
        self.kernel = kernel = boot.kernel
        self.initrd = initrd = boot.initrd
        self.accel = accel = boot.accel
        qemu = boot.qemu
        self.name = name or new_run_name()
        self.paths = RunPaths(run_dir.resolve(), self.name, Path(os.environ.get("APERTURE_SHM", "/dev/shm")),
                              default_sock_dir(self.name))
        self.qemu = qemu or find_qemu()
        self.command_channel = scenario == "idle"  # the helper's `serve` loop reads host commands
        self.user_qmp = user_qmp
        self.argv = build_argv(self.qemu, config, kernel, initrd, self.paths, accel,
                               kernel_cmdline(config, scenario, guest_env), user_qmp,
                               command_channel=self.command_channel, plug_nvme=plug_nvme)
        #: A saved state to start from instead of booting (warm start): QEMU waits for it, paused.
        self.incoming = incoming
        if incoming is not None:
            self.argv += ["-S", "-incoming", "defer"]
        self.restore_s: float | None = None  # QEMU start → restored and running
        self.results = ResultsChannel(self.paths.results)
        self.console = ConsoleLog(self.paths.console)
        self._cmd_sock: socket.socket | None = None
        self.want_shell = shell
        #: With ``shell``: a connection to the guest shell's port, made before the socket's name is unlinked.
        self.shell_sock: socket.socket | None = None
        self._cmd_id = 0
        self.console_sink = console_sink
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: SyncQmpSession | None = None
        self.service: DeviceService | None = None
        self.started_at = 0.0
        self.first_message_at: float | None = None
        #: The device model's log (emulator.log in the run dir), this VM's alone.
        self.log = logging.Logger(f"aperture.vm.{self.name}")
        #: Everything launch creates is registered here before it is created; shutdown unwinds it, newest first.
        self._cleanup = contextlib.ExitStack()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Vm:
        try:
            self.launch()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _register(self, fn: Callable[[], object]) -> None:
        self._cleanup.callback(fn)

    def backing_files(self) -> dict[Path, int]:
        """Every file this VM's guest or device model can fill, and its full size (they start sparse)."""
        files = {self.paths.pmem(i): p.file_size for i, p in enumerate(self.config.pmem)}
        if self.config.nvme:
            files[self.paths.nvme] = self.config.nvme
        for i, dev in enumerate(self.config.devices):
            files[self.paths.devmem(i)] = dev.mem
            files[self.paths.window(i)] = dev.window
        files[self.paths.ram] = self.config.memory
        files[self.paths.probe_bar] = PROBE_BAR_SIZE
        return files

    def check_space(self) -> None:
        """A full run dir or shm dir is refused before anything starts (exit 3, naming the path and the shortfall):
        a sparse file that cannot grow is a SIGBUS in whoever writes it, the guest's QEMU or our device model."""
        need: dict[int, tuple[Path, int]] = {}  # st_dev → (a directory on it, bytes still to be allocated)
        for path, size in self.backing_files().items():
            try:
                missing = max(size - path.stat().st_blocks * 512, 0)
            except FileNotFoundError:
                missing = size
            dev = path.parent.stat().st_dev
            directory, total = need.get(dev, (path.parent, 0))
            need[dev] = (directory, total + missing)
        for directory, missing in need.values():
            vfs = os.statvfs(directory)
            free = vfs.f_bavail * vfs.f_frsize
            if missing > free:
                raise SetupError(f"{directory} has {format_size(free - free % MiB) or '0'} free, but this VM's files "
                                 f"there can grow by {format_size(missing - missing % MiB)}: free space, or put them "
                                 "elsewhere (--run-dir DIR, APERTURE_SHM=DIR)")

    def _prepare_files(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.check_space()
        for stale in (self.paths.console, self.paths.results, self.paths.qemu_log):
            stale.unlink(missing_ok=True)
        for i, p in enumerate(self.config.pmem):
            persistent_file(self.paths.pmem(i), p.file_size, "--pmem size")
        if self.config.nvme:
            persistent_file(self.paths.nvme, self.config.nvme, "--nvme size")
        for shm in self.paths.shm_files(len(self.config.devices)):
            self._register(functools.partial(shm.unlink, missing_ok=True))
        self._register(lambda: shutil.rmtree(self.paths.sock_dir, ignore_errors=True))
        self.paths.sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def launch(self) -> None:
        self._prepare_files()
        self.paths.qmp_socket.unlink(missing_ok=True)
        # Cleanup runs newest first: stop QEMU (via QMP if possible), then close QMP, then the log.
        log = self._cleanup.enter_context(open(self.paths.qemu_log, "wb"))
        self.qmp = SyncQmpSession(self.name, when_lost=self._qemu_died)
        self._register(self._close_qmp)
        # This VM's own logger (not registered in logging's global tree, so nothing global changes and nothing
        # stays behind): the device model's errors go to the run dir's emulator.log only — stderr carries
        # progress and one-line errors.
        handler = logging.FileHandler(self.paths.run_dir / "emulator.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        self._register(handler.close)
        if self.config.devices:
            # Listening before QEMU starts (else QEMU exits); stopped after QEMU (final write-back).
            self.service = DeviceService(
                self.config.devices, self.paths.device_files(len(self.config.devices)), ram=self.paths.ram,
                memory=self.config.memory,
                pmem=[(self.paths.pmem(i), p) for i, p in enumerate(self.config.pmem)], qmp=lambda: self.qmp,
                hotplug=self.config.window_hotplug, log=self.log)
            self._register(self.service.stop)
            self.service.start()
        self._register(self._stop_process)
        self.started_at = time.monotonic()
        try:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=die_with_parent(os.getpid()))
        except OSError as exc:
            raise SetupError(f"cannot start {self.qemu}: {exc.strerror}") from exc
        try:
            self.qmp.connect(str(self.paths.qmp_socket), timeout=15.0, alive=self.alive)
        except GuestError:
            self._raise_exited("QEMU failed to start")
        if self.incoming is not None:
            try:
                load_state(self.qmp, self.incoming)
                self.qmp.cont()
            except GuestError as exc:
                if not self.alive():
                    self._raise_exited(f"restoring {self.incoming.parent.name} failed")
                raise GuestError(f"restoring {self.incoming.parent.name} failed: {exc}") from exc
            self.restore_s = time.monotonic() - self.started_at
        if self.command_channel:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._register(sock.close)
            sock.connect(str(self.paths.command_socket))
            self._cmd_sock = sock
            if self.want_shell:
                shell = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                self._register(shell.close)
                shell.connect(str(self.paths.shell_socket))
                self.shell_sock = shell
        self._drop_names()

    def _drop_names(self) -> None:
        """QEMU has opened every backend and connected every socket (QMP answers only after machine init), and
        the device model holds its files open: unlink the shm names (and, without a user monitor, the socket
        directory) now, so that no process death — ours by kill -9, QEMU's — can leave them behind."""
        for shm in self.paths.shm_files(len(self.config.devices)):
            shm.unlink(missing_ok=True)
        if not self.user_qmp:  # `aperture up` keeps its user QMP and control sockets; `down`/`ls` reap them
            shutil.rmtree(self.paths.sock_dir, ignore_errors=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()

    def _stop_process(self) -> None:
        """QMP quit, then SIGTERM, then SIGKILL: QEMU never outlives the run."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        if self.qmp is not None:
            try:
                self.qmp.quit()
            except GuestError:
                pass
        for sig, wait in ((None, 3.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def shutdown(self) -> None:
        """Release everything this VM created, newest first. Idempotent. A step that fails does not stop the
        others (ExitStack runs them all); the failure is logged, never raised over the run's own outcome."""
        try:
            self._cleanup.close()
        except Exception as exc:  # noqa: BLE001 - cleanup must go on and must not mask the run's result
            logging.getLogger(__name__).warning("cleanup of %s: %s: %s", self.name,
                                                           type(exc).__name__, exc)

    # ------------------------------------------------------------------ observation
    def console_tail(self, lines: int = 25) -> str:
        return self.console.tail(lines)

    def _qemu_output(self) -> str:
        try:
            return self.paths.qemu_log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def _qemu_died(self, lost: Exception) -> Exception | None:
        """A lost QMP connection, explained: once QEMU has exited, it is "QEMU died" with its exit code or signal
        (whatever step was talking to it: boot, snapshot, restore, a check)."""
        if self.process is None:
            return None
        try:
            self.process.wait(2.0)
        except subprocess.TimeoutExpired:
            return None
        try:
            self._raise_exited("QEMU died")
        except VmLaunchError as exc:
            return exc
        return None

    def _raise_exited(self, what: str) -> None:
        code = self.process.wait(10) if self.process else None
        tail = (self._qemu_output().strip() + "\n--- console ---\n" + self.console.tail()).strip()
        first = next((ln for ln in self._qemu_output().splitlines() if ln.strip()), "")
        if code == -signal.SIGBUS:
            first = ("killed by SIGBUS: a memory backing file could not grow (is the run dir or the shm dir full? "
                     f"{self.paths.run_dir}, {self.paths.shm_dir})")
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise VmLaunchError(f"{what} ({how}){': ' + first if first else ''}",
                            exit_code=code, argv=self.argv, output_tail=tail)

    def messages(self, boot_timeout: float | None = None, run_timeout: float | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
        """Yield the helper's JSON messages until ``done`` (or ``should_stop()``); raise GuestError on panic,
        death or timeout."""
        boot_timeout = boot_timeout or self.config.boot_timeout
        run_timeout = run_timeout or self.config.run_timeout
        while True:
            if should_stop is not None and should_stop():
                return
            new_console = self.console.read()
            if new_console and self.console_sink:
                self.console_sink(new_console)
            panic = self.console.panic()
            if panic:
                raise GuestError(f"guest kernel panicked: {panic} (console: {self.paths.console})")
            messages, new_bytes = self.results.read()
            for msg in messages:
                if self.first_message_at is None:
                    self.first_message_at = time.monotonic()
                yield msg
                if msg.get("type") == MsgType.DONE:
                    return
            elapsed = time.monotonic() - self.started_at
            if not self.alive():
                if new_bytes:
                    continue  # drain what the guest wrote before it went away (a partial last line is lost)
                self.console.read()
                panic = self.console.panic()
                if panic:
                    raise GuestError(f"guest kernel panicked: {panic}")
                if self.process is not None and self.process.returncode not in (0, None):
                    self._raise_exited("QEMU died")
                if not self.console.seen_output():
                    raise GuestError("the guest kernel printed nothing on its console before QEMU exited: it died "
                                     "before its serial console came up (an entry point it cannot take — try its "
                                     "bzImage instead of a PVH vmlinux —, a kernel without SERIAL_8250_CONSOLE, "
                                     "or not an x86-64 kernel)")
                raise GuestError(f"guest powered off before the helper finished (console: {self.paths.console})")
            if self.first_message_at is None and elapsed > boot_timeout:
                raise GuestError(f"guest did not boot within {boot_timeout:.0f} s (console: {self.paths.console})")
            if elapsed > run_timeout:
                raise GuestError(f"guest run timed out after {run_timeout:.0f} s (console: {self.paths.console})")
            time.sleep(0.01)

    def poll(self) -> list[dict[str, Any]]:
        """One non-blocking pass over the console and the results channel; raises GuestError on panic or death."""
        passes = iter((False,))
        return list(self.messages(run_timeout=float("inf"), should_stop=lambda: next(passes, True)))

    def wait_idle(self, timeout: float | None = None,
                  on_message: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Wait for the `idle` scenario's helper to finish setting up (DAX configured, serving commands); the
        messages before that go to ``on_message``."""
        for msg in self.messages(run_timeout=timeout):
            if msg.get("type") == MsgType.PHASE and msg.get("name") == Phase.IDLE:
                return
            if on_message is not None:
                on_message(msg)
        raise GuestError("the guest finished without becoming idle")

    def command(self, request: dict[str, Any], timeout: float = 120.0,
                on_message: Callable[[dict[str, Any]], None] | None = None,
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send one command to the helper's `serve` loop; return its cmd-done message and what came before
        (or hand each message to ``on_message`` as it arrives, keeping none)."""
        if self._cmd_sock is None:
            raise GuestError("this VM has no command channel (boot it with scenario 'idle')")
        self._cmd_id += 1
        ident = self._cmd_id
        try:
            self._cmd_sock.sendall(json.dumps(dict(request, id=ident), ensure_ascii=False).encode() + b"\n")
        except OSError as exc:
            raise GuestError(f"guest command channel closed: {exc}") from exc
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        for msg in self.messages(run_timeout=float("inf"), should_stop=lambda: time.monotonic() > deadline):
            if msg.get("type") == MsgType.CMD_DONE and msg.get("id") == ident:
                return msg, seen
            if on_message is not None:
                on_message(msg)
            else:
                seen.append(msg)
        raise GuestError(f"guest command {request} timed out after {timeout:.0f} s")

    def exec(self, command: str, timeout: float = 120.0, cwd: str | None = None,
             on_output: Callable[[str, bytes], None] | None = None) -> tuple[int, str]:
        """Run a shell command in the guest (busybox sh, helper tools on PATH): its exit status (128 + N when
        signal N killed it) and its output. With ``on_output``, each chunk goes there as the guest sends it
        (stream name, bytes) and the returned output is empty."""
        received = 0
        kept = BoundedOutput(EXEC_KEPT_BYTES)

        def take(msg: dict[str, Any]) -> None:
            nonlocal received
            if msg.get("type") != MsgType.CMD_OUTPUT or msg.get("id") != self._cmd_id:
                return
            # The helper escapes every byte >= 0x7f as \u00XX: latin-1 gives the bytes back.
            data = str(msg.get("data", "")).encode("latin-1", "replace")
            received += len(data)
            if on_output is not None:
                on_output(str(msg.get("stream", "stdout")), data)
            else:
                kept.add(data)

        request: dict[str, Any] = {"exec": command}
        if cwd:
            request["cwd"] = cwd
        if on_output is not None:  # streamed, not kept: the guest may send more (the results channel stays bounded)
            request["max_output"] = STREAMED_OUTPUT_MAX
        done, _ = self.command(request, timeout, on_message=take)
        sent = done.get("output_bytes")
        if not done.get("truncated") and not kept.dropped and isinstance(sent, int) and received != sent:
            # Output is never silently incomplete: a chunk was lost (e.g. glued to garbage on the channel).
            raise GuestError(f"guest command output was lost on the results channel: {received} of {sent} bytes "
                             "arrived")
        if on_output is not None and done.get("truncated"):
            on_output("stderr", f"\n[aperture: output beyond {STREAMED_OUTPUT_MAX >> 20} MiB was dropped]\n".encode())
        output = kept.text()
        if done.get("truncated"):
            output += f"\n[output truncated: {done.get('output_bytes')} bytes, the first 1 MiB shown]\n"
        return int(done.get("rc", -1)), output

    def wait_poweroff(self, timeout: float = 15.0) -> float:
        """Wait for the guest to power off after ``done``; return host seconds since QEMU start."""
        if self.process is None:
            return 0.0
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"guest did not power off within {timeout:.0f} s after the helper finished") from exc
        return time.monotonic() - self.started_at

    @property
    def boot_s(self) -> float | None:
        return None if self.first_message_at is None else self.first_message_at - self.started_at
