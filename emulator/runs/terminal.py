"""The host end of the guest shell: the user's terminal in raw mode, relayed to the guest's pseudo-terminal
through the shell port's frames (guest/abi.py SHELL_*; the guest end is guest/helper/shell.c)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import sys
import termios
import time
import tty
from collections.abc import Iterator

from aperture.guest import abi
from aperture.guest.errors import GuestError

#: Ctrl-] detaches (as telnet and virsh console do): the guest's shell is hung up, the VM stays.
DETACH_KEY = b"\x1d"
READY_TIMEOUT_S = 10.0
#: After the end of piped input: Ctrl-D once the guest has been quiet this long, again every EOF_REPEAT_S.
EOF_QUIET_S = 0.3
EOF_REPEAT_S = 1.0
MAX_PAYLOAD = 4096


def frame(kind: int, payload: bytes = b"") -> bytes:
    return abi.SHELL_FRAME.pack(kind, len(payload)) + payload


def winsize() -> bytes:
    cols, rows = shutil.get_terminal_size((80, 24))
    return struct.pack("<HH", rows, cols)


class FrameReader:
    """Whole frames out of the byte stream from the guest (bounded: a frame is at most 64 KiB)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self._buf += data
        head = abi.SHELL_FRAME.size
        while len(self._buf) >= head:
            kind, length = abi.SHELL_FRAME.unpack_from(self._buf)
            if len(self._buf) < head + length:
                return
            yield kind, self._buf[head:head + length]
            self._buf = self._buf[head + length:]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The local terminal in raw mode (keys, Ctrl-C included, go to the guest), restored however we leave."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(sock: socket.socket, stdin_fd: int | None = None, stdout_fd: int | None = None) -> int | None:
    """Open a shell session in the guest and relay until it ends: its exit status, or None when the user
    detached (Ctrl-]). Raises GuestError when the guest does not answer (or another shell is attached)."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    reader = FrameReader()
    sock.sendall(frame(abi.SHELL_OPEN, winsize()))
    ready, _, _ = select.select([sock], [], [], READY_TIMEOUT_S)
    first = sock.recv(65536) if ready else b""
    frames = list(reader.feed(first))
    if frames and frames[0][0] == abi.SHELL_EXIT:
        raise GuestError("the guest could not start a shell (no pseudo-terminal?)")
    if not frames or frames[0][0] != abi.SHELL_READY:
        raise GuestError("the guest shell did not answer (another `aperture shell` may be attached)")
    with raw_terminal(stdin_fd):
        return _relay(sock, reader, frames[1:], stdin_fd, stdout_fd)


def _relay(sock: socket.socket, reader: FrameReader, pending: list[tuple[int, bytes]], stdin_fd: int,
           stdout_fd: int) -> int | None:
    """Keys to the guest, its terminal's output to ours; the window size follows ours (checked twice a second)."""
    last_size = winsize()
    for kind, payload in pending:
        status = _deliver(kind, payload, stdout_fd)
        if status is not None:
            return status
    stdin_open = True
    last_output = last_eof = 0.0
    while True:
        size = winsize()
        if size != last_size:
            sock.sendall(frame(abi.SHELL_WINSIZE, size))
            last_size = size
        now = time.monotonic()
        if not stdin_open and now - last_output >= EOF_QUIET_S and now - last_eof >= EOF_REPEAT_S:
            # End of input (a script piped in): the terminal's end-of-file, as typing Ctrl-D would, once the
            # guest is quiet (a Ctrl-D typed ahead of the shell's own start is lost) and again until it exits —
            # the shell finishes what it was given and exits, and so do we (like `ssh host < script`).
            sock.sendall(frame(abi.SHELL_DATA, b"\x04"))
            last_eof = now
        watch = [sock] + ([stdin_fd] if stdin_open else [])
        try:
            readable, _, _ = select.select(watch, [], [], 0.1 if not stdin_open else 0.5)
        except InterruptedError:
            continue
        if stdin_fd in readable:
            data = os.read(stdin_fd, MAX_PAYLOAD)
            if not data:
                stdin_open = False
                continue
            if DETACH_KEY in data:
                before = data.split(DETACH_KEY, 1)[0]
                if before:
                    sock.sendall(frame(abi.SHELL_DATA, before))
                sock.sendall(frame(abi.SHELL_HANGUP))
                return None
            sock.sendall(frame(abi.SHELL_DATA, data))
        if sock in readable:
            data = sock.recv(65536)
            if not data:
                raise GuestError("the guest shell's port closed (the VM has stopped)")
            last_output = time.monotonic()
            for kind, payload in reader.feed(data):
                status = _deliver(kind, payload, stdout_fd)
                if status is not None:
                    return status


def _deliver(kind: int, payload: bytes, stdout_fd: int) -> int | None:
    if kind == abi.SHELL_DATA:
        os.write(stdout_fd, payload)
    elif kind == abi.SHELL_EXIT:
        return int(struct.unpack("<i", payload[:4].ljust(4, b"\0"))[0])
    return None
