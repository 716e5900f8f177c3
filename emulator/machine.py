"""``Vm``: one QEMU process with its run directory, backing files, console and results channel.

In the spirit of QEMU's ``QEMUMachine``: a context manager; a launch failure raises one error carrying the
exit code, the command line and QEMU's output; everything the run creates is registered with ``_cleanup``
*before* it is created, and ``shutdown`` (the one place cleanup lives) runs on success, failure and Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aperture.guest.abi import MsgType
from aperture.guest.errors import ConfigError, GuestError, SetupError, VmLaunchError
from aperture.guest.kernelspec import KernelSpec
from aperture.guest.units import MiB, format_size
from aperture.qmp_client.qemu import find_qemu
from aperture.qmp_client.session import SyncQmpSession

from .config import PROBE_BAR_SIZE, VmConfig
from .qemu_argv import build_argv, kernel_cmdline
from .runpaths import RunPaths, default_sock_dir, new_run_name
from .service import DeviceService

PANIC_RE = re.compile(r"Kernel panic - not syncing[^\n]*")
RESULTS_PORT = "aperture.results"
COMMAND_PORT = "aperture.cmd"
PROBE_BAR_SLOT = 0x0F


#: The results channel is untrusted input: a line longer than this is dropped (and noted), and each pass
#: reads at most RESULTS_READ_MAX bytes of it.
RESULTS_LINE_MAX = 1 << 20
RESULTS_READ_MAX = 4 << 20
#: A guest that writes more than this on the results channel in one boot is stopped (exit 4): it is flooding,
#: and results.jsonl (QEMU's file) must not fill the run dir.
RESULTS_TOTAL_MAX = 256 << 20
#: Deeper JSON than this is not a message the helper sends (and could exhaust the parser's recursion).
RESULTS_DEPTH_MAX = 64


def parse_result_line(raw: bytes) -> dict[str, Any]:
    """One line of the results channel as a message dict; anything else becomes a ``garbage`` message."""
    depth = max_depth = 0
    # Bracket depth, ignoring strings only roughly: an upper bound is all we need. Scanned byte by byte only
    # when the line holds enough opening brackets to be that deep (counting them is cheap; the scan is not).
    if raw.count(b"[") + raw.count(b"{") > RESULTS_DEPTH_MAX:
        for byte in raw:
            if byte in b"[{":
                depth += 1
                max_depth = max(max_depth, depth)
            elif byte in b"]}":
                depth -= 1
    if max_depth > RESULTS_DEPTH_MAX:
        return {"type": MsgType.GARBAGE, "raw": raw[:200].decode("utf-8", "replace"),
                "why": f"nested deeper than {RESULTS_DEPTH_MAX}"}
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        return {"type": MsgType.GARBAGE, "raw": raw[:200].decode("utf-8", "replace")}
    if not isinstance(msg, dict):
        return {"type": MsgType.GARBAGE, "raw": str(msg)[:200]}
    return msg


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: QEMU gets SIGKILL when the process that owns its device model dies (even by
    SIGKILL), so it never runs on with nobody serving its devices. (QEMU's own ``-run-with exit-with-parent``
    is not in every build.)"""

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the owner died between fork and prctl
            os._exit(1)

    return arm


def persistent_file(path: Path, size: int, option: str) -> None:
    """A backing file that keeps its contents across runs of one run dir: created sparse, or reused at its size."""
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)
    elif path.stat().st_size != size:
        raise ConfigError(f"{path} exists with {format_size(path.stat().st_size)} but the configuration wants "
                          f"{format_size(size)}; use another --run-dir or the same {option}")


class Vm:
    """A VM: ``with Vm(...) as vm: for msg in vm.messages(): ...``."""

    def __init__(self, config: VmConfig, kernel: KernelSpec, initrd: Path, *, accel: str, run_dir: Path,
                 scenario: str = "default", name: str | None = None, qemu: str | None = None,
                 console_sink: Callable[[str], None] | None = None, guest_env: dict[str, str] | None = None,
                 user_qmp: bool = False) -> None:
        self.config = config
        self.kernel = kernel
        self.initrd = initrd
        self.accel = accel
        self.name = name or new_run_name()
        self.paths = RunPaths(run_dir.resolve(), self.name, Path(os.environ.get("APERTURE_SHM", "/dev/shm")),
                              default_sock_dir(self.name))
        self.qemu = qemu or find_qemu()
        self.command_channel = scenario == "idle"  # the helper's `serve` loop reads host commands
        self.user_qmp = user_qmp
        self.argv = build_argv(self.qemu, config, kernel, initrd, self.paths, accel,
                               kernel_cmdline(config, scenario, guest_env), user_qmp,
                               command_channel=self.command_channel)
        self._results_pos = 0
        self._results_buf = b""
        self._skip_to_newline = False
        self._cmd_sock: socket.socket | None = None
        self._cmd_id = 0
        self.console_sink = console_sink
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: SyncQmpSession | None = None
        self.service: DeviceService | None = None
        self.started_at = 0.0
        self.first_message_at: float | None = None
        self._cleanup: list[Callable[[], None]] = []
        self._console_pos = 0
        self._console_text = ""

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

    def _register(self, fn: Callable[[], None]) -> None:
        self._cleanup.append(fn)

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
        log = open(self.paths.qemu_log, "wb")
        self._register(log.close)
        self.qmp = SyncQmpSession(self.name)
        self._register(self._close_qmp)
        handler = logging.FileHandler(self.paths.run_dir / "emulator.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        emulator_log = logging.getLogger("aperture.emulator")
        emulator_log.addHandler(handler)
        emulator_log.propagate = False  # to the run dir only: stderr carries progress and one-line errors

        def close_log() -> None:
            emulator_log.removeHandler(handler)
            handler.close()

        self._register(close_log)
        if self.config.devices:
            # Listening before QEMU starts (else QEMU exits); stopped after QEMU (final write-back).
            self.service = DeviceService(
                self.config.devices, self.paths.device_files(len(self.config.devices)), ram=self.paths.ram,
                memory=self.config.memory,
                pmem=[(self.paths.pmem(i), p) for i, p in enumerate(self.config.pmem)], qmp=lambda: self.qmp,
                hotplug=self.config.window_hotplug)
            self._register(self.service.stop)
            self.service.start()
        self._register(self._stop_process)
        self.started_at = time.monotonic()
        try:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=die_with_parent(os.getpid()))
        except OSError as exc:
            raise SetupError(f"cannot start {self.qemu}: {exc.strerror}") from None
        try:
            self.qmp.connect(str(self.paths.qmp_socket), timeout=15.0, alive=self.alive)
        except GuestError:
            self._raise_exited("QEMU failed to start")
        if self.command_channel:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._register(sock.close)
            sock.connect(str(self.paths.command_socket))
            self._cmd_sock = sock
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
        """Release everything this VM created, newest first. Idempotent."""
        while self._cleanup:
            fn = self._cleanup.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass

    # ------------------------------------------------------------------ observation
    def console_tail(self, lines: int = 25) -> str:
        self._read_console()
        return "\n".join(self._console_text.splitlines()[-lines:])

    def _read_console(self) -> str:
        try:
            with open(self.paths.console, "rb") as f:
                f.seek(self._console_pos)
                new = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        self._console_pos += len(new.encode("utf-8", "replace"))
        self._console_text = (self._console_text + new)[-200_000:]
        return new

    def _qemu_output(self) -> str:
        try:
            return self.paths.qemu_log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def _raise_exited(self, what: str) -> None:
        code = self.process.wait(10) if self.process else None
        tail = (self._qemu_output().strip() + "\n--- console ---\n" + self.console_tail()).strip()
        first = next((ln for ln in self._qemu_output().splitlines() if ln.strip()), "")
        if code == -signal.SIGBUS:
            first = ("killed by SIGBUS: a memory backing file could not grow (is the run dir or the shm dir full? "
                     f"{self.paths.run_dir}, {self.paths.shm_dir})")
        raise VmLaunchError(f"{what} (exit code {code}){': ' + first if first else ''}",
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
            new_console = self._read_console()
            if new_console and self.console_sink:
                self.console_sink(new_console)
            panic = PANIC_RE.search(self._console_text)
            if panic:
                raise GuestError(f"guest kernel panicked: {panic.group(0).strip()} (console: {self.paths.console})")
            try:
                with open(self.paths.results, "rb") as f:
                    f.seek(self._results_pos)
                    chunk = f.read(RESULTS_READ_MAX)  # bounded: the guest controls how much is there
            except FileNotFoundError:
                chunk = b""
            self._results_pos += len(chunk)
            self._results_buf += chunk
            if self._results_pos > RESULTS_TOTAL_MAX:
                raise GuestError(f"the guest wrote more than {RESULTS_TOTAL_MAX >> 20} MiB on the results channel: "
                                 f"stopped as a flood (see {self.paths.results})")
            while True:
                if self._skip_to_newline:  # the rest of an over-long line: dropped without a word
                    nl = self._results_buf.find(b"\n")
                    if nl < 0:
                        self._results_buf = b""
                        break
                    self._results_buf = self._results_buf[nl + 1:]
                    self._skip_to_newline = False
                nl = self._results_buf.find(b"\n", 0, RESULTS_LINE_MAX + 1)
                if nl >= 0:
                    raw, self._results_buf = self._results_buf[:nl], self._results_buf[nl + 1:]
                    msg = parse_result_line(raw)
                elif len(self._results_buf) > RESULTS_LINE_MAX:
                    msg = {"type": MsgType.GARBAGE, "raw": self._results_buf[:200].decode("utf-8", "replace"),
                           "why": f"line longer than {RESULTS_LINE_MAX} bytes"}
                    end = self._results_buf.find(b"\n")
                    self._results_buf = self._results_buf[end + 1:] if end >= 0 else b""
                    self._skip_to_newline = end < 0
                else:
                    break
                if self.first_message_at is None:
                    self.first_message_at = time.monotonic()
                yield msg
                if msg.get("type") == MsgType.DONE:
                    return
            elapsed = time.monotonic() - self.started_at
            if not self.alive():
                if chunk:
                    continue  # drain what the guest wrote before it went away (a partial last line is lost)
                self._read_console()
                panic = PANIC_RE.search(self._console_text)
                if panic:
                    raise GuestError(f"guest kernel panicked: {panic.group(0).strip()}")
                if self.process is not None and self.process.returncode not in (0, None):
                    self._raise_exited("QEMU died")
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

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the `idle` scenario's helper to finish setting up (DAX configured, serving commands)."""
        for msg in self.messages(run_timeout=timeout):
            if msg.get("type") == MsgType.PHASE and msg.get("name") == "idle":
                return
        raise GuestError("the guest finished without becoming idle")

    def command(self, request: dict[str, Any], timeout: float = 120.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send one command to the helper's `serve` loop; return its cmd-done message and what came before."""
        if self._cmd_sock is None:
            raise GuestError("this VM has no command channel (boot it with scenario 'idle')")
        self._cmd_id += 1
        ident = self._cmd_id
        try:
            self._cmd_sock.sendall(json.dumps(dict(request, id=ident), ensure_ascii=False).encode() + b"\n")
        except OSError as exc:
            raise GuestError(f"guest command channel closed: {exc}") from None
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        for msg in self.messages(run_timeout=float("inf"), should_stop=lambda: time.monotonic() > deadline):
            if msg.get("type") == MsgType.CMD_DONE and msg.get("id") == ident:
                return msg, seen
            seen.append(msg)
        raise GuestError(f"guest command {request} timed out after {timeout:.0f} s")

    def exec(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run a shell command in the guest (busybox sh, helper tools on PATH): its exit status and output."""
        done, seen = self.command({"exec": command}, timeout)
        ident = done.get("id")
        chunks = [str(m.get("data", "")) for m in seen if m.get("type") == MsgType.CMD_OUTPUT and m.get("id") == ident]
        # The helper escapes every byte >= 0x7f as \u00XX: latin-1 gives the bytes back, then decode them as UTF-8.
        raw = "".join(chunks).encode("latin-1", "replace")
        sent = done.get("output_bytes")
        if not done.get("truncated") and isinstance(sent, int) and len(raw) != sent:
            # Output is never silently incomplete: a chunk was lost (e.g. glued to garbage on the channel).
            raise GuestError(f"guest command output was lost on the results channel: {len(raw)} of {sent} bytes "
                             "arrived")
        output = raw.decode("utf-8", "replace")
        if done.get("truncated"):
            output += f"\n[output truncated: {done.get('output_bytes')} bytes, the first 1 MiB shown]\n"
        return int(done.get("rc", -1)), output

    def wait_poweroff(self, timeout: float = 15.0) -> float:
        """Wait for the guest to power off after ``done``; return host seconds since QEMU start."""
        if self.process is None:
            return 0.0
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"guest did not power off within {timeout:.0f} s after the helper finished") from None
        return time.monotonic() - self.started_at

    @property
    def boot_s(self) -> float | None:
        return None if self.first_message_at is None else self.first_message_at - self.started_at
