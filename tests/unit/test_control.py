"""The daemon's control socket keeps each error's category: a refusal exits as the daemon classed it, a gone
daemon is a GuestError (4), an unclassed failure a bug (70)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from aperture.emulator.daemon.control import ControlRefused, call
from aperture.guest.errors import DaemonGone, GuestError


def _serve_once(path: Path, reply: bytes | None) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        if reply is not None:
            conn.sendall(reply)
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(("reply", "code"), [(b'{"ok": false, "error": "bad slot", "exit_code": 2}\n', 2),
                                              (b'{"ok": false, "error": "no kernel", "exit_code": 3}\n', 3),
                                              (b'{"ok": false, "error": "KeyError: x"}\n', 70)])
def test_a_refusal_keeps_its_category(tmp_path: Path, reply: bytes, code: int) -> None:
    sock = tmp_path / "c.sock"
    t = _serve_once(sock, reply)
    with pytest.raises(ControlRefused) as err:
        call(str(sock), "window.map", slot="x")
    assert err.value.exit_code == code and not isinstance(err.value, GuestError)
    t.join(5)


def test_a_daemon_that_goes_away_is_a_guest_error(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    t = _serve_once(sock, None)
    with pytest.raises(DaemonGone) as err:
        call(str(sock), "status")
    assert err.value.exit_code == 4
    t.join(5)
    with pytest.raises(DaemonGone):
        call(str(tmp_path / "nothing.sock"), "status")
