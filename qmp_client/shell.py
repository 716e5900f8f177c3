"""``aperture qmp NAME``: an interactive (or scripted) QMP shell with aperture's domain commands.

Raw QMP in qmp-shell syntax (``query-pci``, ``device_del id=x``; values are JSON when they parse, else
strings) or a whole JSON command. Domain commands go to the VM daemon: ``window show [DEV]``, ``window map
DEV SLOT PAGE``, ``window unmap DEV SLOT``, ``memmap``, ``dma stats``, ``remap start EVERY``, ``remap stop``,
``guest CMD...`` (a shell command in the guest).
Bad input, unknown commands and a vanished QEMU give one-line messages; the shell keeps going.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from aperture.guest.errors import ApertureError, DaemonGone
from aperture.guest.units import parse_duration
from aperture.qmp_client.errors import QemuGone
from qemu.qmp.qmp_shell import QMPShell, QMPShellError

from .session import SyncQmpSession

DOMAIN = {
    "window show [DEV]": "slot → page table of one or every device",
    "window map DEV SLOT PAGE": "map a device page into a window slot (VM paused around it)",
    "window unmap DEV SLOT": "write the slot back and empty it",
    "memmap": "the guest-physical address map the DMA engine uses",
    "dma stats": "per-device counters: completions, maps, remaps, DMA bytes, errors",
    "remap start EVERY": "remap random slots every EVERY (e.g. 20ms) until 'remap stop'",
    "remap stop": "stop remapping; prints latency percentiles",
    "guest CMD...": "run a shell command in the guest (busybox sh; aperture-helper tools on PATH)",
}


GUEST_TIMEOUT = 120.0  # seconds a `guest CMD` may run


class ShellError(ApertureError):
    pass


class QmpSyntax(QMPShell):
    """QEMU's own qmp-shell syntax (qemu.qmp.qmp_shell.QMPShell): ``name key=value ...``, dotted keys for nested
    arguments (``a.b=1``), JSON-ish values, ``transaction( ... )``. Only its parser is used: the connection,
    output and domain commands are ours (one-line errors, --json lines, the daemon's commands)."""

    def __init__(self) -> None:  # no QEMUMonitorProtocol.__init__: this object never connects
        self._transmode = False
        self._actions: list[Any] = []

    def __del__(self) -> None:  # nothing to close: never connected
        pass

    def parse(self, line: str) -> tuple[str, dict[str, Any]] | None:
        """The command and its arguments, or None while a transaction is being collected."""
        try:
            shlex.split(line)  # unbalanced quotes: refuse here (qmp-shell would send what it could parse)
        except ValueError as exc:
            raise ShellError(f"malformed arguments: {exc}") from exc
        try:
            cmd = self._build_cmd(line)
        except (QMPShellError, ValueError, SyntaxError) as exc:
            raise ShellError(f"malformed arguments: {exc}") from exc
        if cmd is None:
            return None
        return str(cmd["execute"]), dict(cmd.get("arguments") or {})


def parse_qmp(line: str, syntax: QmpSyntax | None = None) -> tuple[str, dict[str, Any]] | None:
    """A JSON command object, or a line in qmp-shell syntax → (command, arguments); None inside a transaction."""
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ShellError(f"malformed JSON: {exc.msg}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("execute"), str):
            raise ShellError('a JSON command needs {"execute": NAME, "arguments": {...}}')
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            raise ShellError("arguments must be an object")
        return obj["execute"], args
    return (syntax or QmpSyntax()).parse(line)


class DeviceControl(Protocol):
    """Sends one domain command to whoever owns the device model (the VM daemon) and returns its result."""

    def __call__(self, cmd: str, timeout: float = 30.0, **args: Any) -> Any: ...


@dataclass(frozen=True)
class ShellTarget:
    """The running VM a shell talks to: its name (the prompt), QEMU's pid (the banner), its QMP socket, the
    device model's control and where readline keeps history."""

    name: str
    qemu_pid: int
    qmp_socket: str
    control: DeviceControl
    history: Path


class QmpShell:
    def __init__(self, target: ShellTarget, *, as_json: bool = False, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> None:
        self.target = target
        self.as_json = as_json
        self.out = out
        self.err = err
        self.qmp = SyncQmpSession(f"shell-{target.name}")
        self.qmp.connect(target.qmp_socket, timeout=5)
        try:
            self.commands = self.qmp.call(self.qmp.session.commands())
        except ApertureError:
            self.commands = []
        self.failures = 0
        #: The exit status the shell ends with: 0, 2 (a line was malformed or refused), 4 (QEMU or the daemon went
        #: away) — the worst seen, as the README's table means them.
        self.exit_code = 0
        self.qemu_gone = False
        self.syntax = QmpSyntax()

    # ------------------------------------------------------------------ output
    def _reply(self, line: str, result: Any, human: Callable[[Any], str] | None = None) -> None:
        if self.as_json:
            print(json.dumps({"command": line, "ok": True, "return": result}), file=self.out, flush=True)
        else:
            print(human(result) if human else json.dumps(result, indent=2), file=self.out, flush=True)

    def _error(self, line: str, message: str, exit_code: int = 2) -> None:
        self.failures += 1
        self.exit_code = max(self.exit_code, exit_code)
        if self.as_json:
            print(json.dumps({"command": line, "ok": False, "error": message}), file=self.out, flush=True)
        else:
            print(f"error: {message}", file=self.err, flush=True)

    # ------------------------------------------------------------------ commands
    def _domain(self, words: list[str], line: str) -> tuple[Any, Callable[[Any], str] | None]:
        call = self.target.control
        if words[0] == "guest" and len(words) > 1:  # the rest of the line, spacing and quotes as typed
            command = line.split(None, 1)[1]
            return call("exec", timeout=GUEST_TIMEOUT + 10, command=command, timeout_s=GUEST_TIMEOUT), _show_exec
        head = " ".join(words[:2])
        if words[0] == "window" and len(words) >= 2 and words[1] == "show" and len(words) <= 3:
            if len(words) == 3:
                return call("window.show", dev=words[2]), _show_windows
            return call("window.show"), _show_windows
        if head == "window map" and len(words) == 5:
            return call("window.map", dev=words[2], slot=words[3], page=words[4]), _show_remap
        if head == "window unmap" and len(words) == 4:
            return call("window.unmap", dev=words[2], slot=words[3]), _show_remap
        if words == ["memmap"]:
            return call("memmap"), _show_memmap
        if words == ["dma", "stats"]:
            return call("dma.stats"), _show_dma_stats
        if head == "remap start" and len(words) == 3:
            return call("remap.start", every=parse_duration(words[2])), str
        if words == ["remap", "stop"]:
            return call("remap.stop", timeout=60), _show_remap_summary
        usage = next((u for u in DOMAIN if u.split()[:2] == words[:2]), None) or \
            next((u for u in DOMAIN if u.split()[0] == words[0]), None)
        raise ShellError(f"usage: {usage}" if usage else f"unknown command {words[0]!r}")

    def run_line(self, line: str) -> bool:
        """Run one line; False means the user asked to leave."""
        line = line.strip()
        if not line or line.startswith("#"):
            return True
        if line in ("quit", "exit"):
            return False
        if line in ("help", "?"):
            print("QMP: any command from query-commands in qmp-shell syntax ('name key=value ...', dotted keys "
                  "for nested arguments, 'transaction(' ... ')') or as JSON. Domain commands:", file=self.out)
            for usage, what in DOMAIN.items():
                print(f"  {usage:<28} {what}", file=self.out)
            return True
        try:
            words = line.split()
            if words[0] in ("window", "memmap", "dma", "remap", "guest"):
                result, human = self._domain(words, line)
                self._reply(line, result, human)
                return True
            parsed = parse_qmp(line, self.syntax)
            if parsed is None:
                return True  # an action of a transaction( ... ): sent with its closing ')'
            cmd, args = parsed
            if self.commands and cmd not in self.commands:
                raise ShellError(f"unknown command {cmd!r} (try 'help', or tab completion)")
            if self.qemu_gone:
                raise ShellError("QEMU is gone; only 'quit' is left")
            self._reply(line, self.qmp.execute(cmd, args or None))
        except (QemuGone, DaemonGone) as exc:
            self.qemu_gone = True
            self._error(line, f"{exc.one_line()}: QEMU is gone", 4)
        except ApertureError as exc:
            self._error(line, exc.one_line())
        return True

    def loop(self, stream: TextIO) -> int:
        interactive = stream.isatty()
        if interactive:
            _setup_readline(self.commands + sorted({u.split()[0] for u in DOMAIN}) + ["help", "quit"],
                            self.target.history)
            print(f"aperture qmp: {self.target.name} (QEMU pid {self.target.qemu_pid}); 'help' lists commands, "
                  "'quit' leaves", file=self.out)
        try:
            while True:
                try:
                    line = input(f"({self.target.name}) ") if interactive else stream.readline()
                except EOFError:
                    break
                except KeyboardInterrupt:
                    print(file=self.out)
                    continue
                if not interactive and line == "":
                    break
                if not self.run_line(line):
                    break
            if self.syntax._transmode:  # input ended inside "transaction(": nothing of it was sent
                self._error("transaction(", "input ended inside transaction( ... ): nothing of it was sent (close "
                            "it with ')')")
        finally:
            self.qmp.close()
        return self.exit_code


def _setup_readline(words: list[str], history: Path) -> None:
    try:
        import readline
    except ImportError:
        return
    try:
        readline.read_history_file(history)
    except OSError:
        pass

    def complete(text: str, state: int) -> str | None:
        matches = [w for w in words if w.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" ")
    readline.parse_and_bind("tab: complete")
    import atexit

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)


def _show_windows(devs: list[dict[str, Any]]) -> str:
    lines = []
    for d in devs:
        lines.append(f"device {d['device']}: {d['nr_slots']} slots of {d['slot_size'] >> 20}M, {d['pages']} pages, "
                     f"hidden {[[h[0] >> 20, h[1] >> 20] for h in d['hidden']]} MiB, generation {d['generation']}")
        for slot, page in enumerate(d["slots"]):
            lines.append(f"  slot {slot}: {'-' if page is None else f'page {page}'}")
    return "\n".join(lines)


def _show_remap(result: dict[str, Any]) -> str:
    """window map/unmap: the device's slots after the remap, and how long the VM was paused for it."""
    slots = result.get("slots") or []
    table = "  ".join(f"{slot}:{'-' if page is None else page}" for slot, page in enumerate(slots))
    return f"remapped in {float(result.get('latency_ms', 0)):.2f} ms (VM paused around it)\n  slot:page  {table}"


def _show_dma_stats(devs: list[dict[str, Any]]) -> str:
    head = f"{'dev':>3} {'doorbells':>9} {'completed':>9} {'maps':>6} {'remaps':>6} {'dma bytes':>12} " \
           f"{'descr':>7} {'ring err':>8}  errors"
    rows = [head]
    for d in devs:
        errors = ", ".join(f"{k} {v}" for k, v in sorted((d.get("errors") or {}).items())) or "-"
        rows.append(f"{d.get('index'):>3} {d.get('doorbells'):>9} {d.get('completed'):>9} {d.get('maps'):>6} "
                    f"{d.get('remaps'):>6} {d.get('dma_bytes'):>12} {d.get('dma_descriptors'):>7} "
                    f"{d.get('ring_errors'):>8}  {errors}")
    return "\n".join(rows)


def _show_remap_summary(s: dict[str, Any]) -> str:
    rows = [f"{s.get('remaps')} remaps ({s.get('mode')} mode), {s.get('slots_moved')} slots moved",
            f"  latency ms: p50 {s.get('latency_ms_p50')}  p99 {s.get('latency_ms_p99')}  "
            f"max {s.get('latency_ms_max')}"]
    errors = s.get("errors") or []
    rows.append(f"  errors: {'; '.join(map(str, errors))}" if errors else "  errors: none")
    return "\n".join(rows)


def _show_exec(result: dict[str, Any]) -> str:
    output = str(result.get("output", "")).rstrip("\n")
    return output + (f"\n[exit {result.get('rc')}]" if result.get("rc") != 0 else "")


def _show_memmap(regions: list[dict[str, Any]]) -> str:
    return "\n".join(f"  {r['start']:#014x}-{r['end']:#014x}  {r['kind']:<8} {'dma' if r['dma'] else '   '}  "
                     f"{r['name']}" for r in regions)
