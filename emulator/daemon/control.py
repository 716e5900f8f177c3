"""Client for a long-lived VM's control socket: one JSON request per line, one JSON reply per line."""

from __future__ import annotations

import json
import socket
from typing import Any

from aperture.guest.errors import ApertureError, DaemonGone


class ControlRefused(ApertureError):
    """The VM daemon refused a request; ``exit_code`` is the category the daemon gave it (2 bad request, 3
    environment, 4 guest), so a refusal means the same across the control socket as it would in-process."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code in (2, 3, 4) else 70


def call(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            chunks: list[bytes] = []
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            buf = b"".join(chunks)
    except OSError as exc:
        raise DaemonGone(f"VM control socket unreachable ({exc.strerror or exc}); is the VM still up?") from exc
    if not buf:  # the daemon closed the connection without a word: it died (or was killed) meanwhile
        raise DaemonGone("the VM daemon closed the connection without replying: it has stopped (see 'aperture ls')")
    try:
        reply = json.loads(buf)
    except (ValueError, RecursionError) as exc:
        raise DaemonGone(f"garbled reply from the VM daemon: {buf[:80]!r}") from exc
    if not reply.get("ok"):
        code = reply.get("exit_code")
        raise ControlRefused(str(reply.get("error", "command failed")), code if isinstance(code, int) else 70)
    return reply.get("result")
