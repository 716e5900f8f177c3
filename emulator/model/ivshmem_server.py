"""The server side of QEMU's ivshmem protocol (docs/specs/ivshmem-spec.rst), nothing device-specific.

On connect a client gets: protocol version 0, its id, -1 with the shared-memory fd, then for each peer one
message per vector carrying that peer's eventfd, then its own id once per vector with its own eventfds. QEMU
is peer 0 (an ivshmem device with master=on, which is what makes it migratable, must be the first peer) and
we are peer ``server_peer`` (1): the guest rings us with Doorbell = (1 << 16) | vector, which QEMU turns into
a write to our eventfd for that vector.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

PROTOCOL_VERSION = 0
CLIENT_ID = 0


class IvshmemServer:
    def __init__(self, path: Path, shm_fd: int, vectors: int = 1, server_peer: int = 1) -> None:
        if server_peer == CLIENT_ID:
            raise ValueError("the server's peer id must differ from the client's")
        self.server_peer = server_peer
        self.path = path
        self.shm_fd = shm_fd
        self.vectors = vectors
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.setblocking(False)
        # Our own doorbell eventfds (the guest → us direction), kept across client reconnects.
        self.doorbells = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(vectors)]
        self.client: socket.socket | None = None
        self._client_fds: list[int] = []

    @staticmethod
    def _send(conn: socket.socket, value: int, fd: int | None = None) -> None:
        data = struct.pack("<q", value)
        if fd is None:
            conn.sendall(data)
        else:
            socket.send_fds(conn, [data], [fd])

    def accept(self) -> socket.socket | None:
        """Accept one client and send the whole handshake at once (QEMU blocks until it has it)."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.setblocking(True)
        self.drop_client()
        try:
            self._send(conn, PROTOCOL_VERSION)
            self._send(conn, CLIENT_ID)
            self._send(conn, -1, self.shm_fd)
            for fd in self.doorbells:
                self._send(conn, self.server_peer, fd)
            self._client_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(self.vectors)]
            for fd in self._client_fds:
                self._send(conn, CLIENT_ID, fd)
        except OSError:
            conn.close()
            return None
        conn.setblocking(False)
        self.client = conn
        return conn

    def drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        for fd in self._client_fds:
            os.close(fd)
        self._client_fds = []

    def close(self) -> None:
        self.drop_client()
        for fd in self.doorbells:
            try:
                os.close(fd)
            except OSError:
                pass
        self.doorbells = []
        self.sock.close()
        self.path.unlink(missing_ok=True)
