"""What the guest writes that the host reads: the results channel (JSON lines on a virtio-serial port, which
QEMU appends to a file) and the serial console. Both are untrusted input: every read is bounded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aperture.guest.abi import MsgType
from aperture.guest.errors import GuestError

PANIC_RE = re.compile(r"Kernel panic - not syncing[^\n]*")

#: A line longer than this is dropped (and noted); each pass reads at most RESULTS_READ_MAX bytes.
RESULTS_LINE_MAX = 1 << 20
RESULTS_READ_MAX = 4 << 20
#: A guest that writes more than this on the results channel in one boot is stopped (exit 4): it is flooding,
#: and results.jsonl (QEMU's file) must not fill the run dir.
RESULTS_TOTAL_MAX = 256 << 20
#: Deeper JSON than this is not a message the helper sends (and could exhaust the parser's recursion).
RESULTS_DEPTH_MAX = 64
#: The console text kept for panic detection and error messages.
CONSOLE_KEPT = 200_000


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


class ResultsChannel:
    """Reads the results file incrementally: whole lines become messages, a partial line waits for the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.total = 0  # bytes read so far
        self._buf = b""
        self._skip_to_newline = False

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """One bounded pass: the messages completed since the last, and how many new bytes it read."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.total)
                chunk = f.read(RESULTS_READ_MAX)  # bounded: the guest controls how much is there
        except FileNotFoundError:
            chunk = b""
        self.total += len(chunk)
        self._buf += chunk
        if self.total > RESULTS_TOTAL_MAX:
            raise GuestError(f"the guest wrote more than {RESULTS_TOTAL_MAX >> 20} MiB on the results channel: "
                             f"stopped as a flood (see {self.path})")
        return self._lines(), len(chunk)

    def _lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self._skip_to_newline:  # the rest of an over-long line: dropped without a word
                nl = self._buf.find(b"\n")
                if nl < 0:
                    self._buf = b""
                    return out
                self._buf = self._buf[nl + 1:]
                self._skip_to_newline = False
            nl = self._buf.find(b"\n", 0, RESULTS_LINE_MAX + 1)
            if nl >= 0:
                raw, self._buf = self._buf[:nl], self._buf[nl + 1:]
                out.append(parse_result_line(raw))
            elif len(self._buf) > RESULTS_LINE_MAX:
                out.append({"type": MsgType.GARBAGE, "raw": self._buf[:200].decode("utf-8", "replace"),
                            "why": f"line longer than {RESULTS_LINE_MAX} bytes"})
                end = self._buf.find(b"\n")
                self._buf = self._buf[end + 1:] if end >= 0 else b""
                self._skip_to_newline = end < 0
            else:
                return out


class ConsoleLog:
    """The serial console QEMU writes to a file: read as it grows, the last CONSOLE_KEPT characters kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = ""
        self._pos = 0

    def read(self) -> str:
        """What was written since the last read."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                raw = f.read()
        except FileNotFoundError:
            return ""
        self._pos += len(raw)
        new = raw.decode("utf-8", "replace")
        self.text = (self.text + new)[-CONSOLE_KEPT:]
        return new

    def seen_output(self) -> bool:
        """Whether the guest has written anything to its console yet."""
        return self._pos > 0

    def panic(self) -> str | None:
        found = PANIC_RE.search(self.text)
        return found.group(0).strip() if found else None

    def tail(self, lines: int = 25) -> str:
        self.read()
        return "\n".join(self.text.splitlines()[-lines:])
