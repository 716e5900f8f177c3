"""Typed QMP session on qemu.qmp's asyncio ``QMPClient``, plus a thread-backed synchronous facade.

Every qemu.qmp failure is turned into ``QmpError`` (``QemuGone`` when the connection is lost) so callers deal
with one hierarchy.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aperture.qmp_client.errors import QemuGone, QmpError
from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError

T = TypeVar("T")


@dataclass(frozen=True)
class MemoryDevice:
    """One entry of ``query-memory-devices`` (NVDIMMs and DIMMs)."""

    kind: str
    id: str | None
    addr: int
    size: int
    memdev: str | None

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> MemoryDevice:
        data = raw.get("data", {})
        return cls(raw.get("type", "?"), data.get("id"), int(data.get("addr", 0)), int(data.get("size", 0)),
                   data.get("memdev"))


@dataclass(frozen=True)
class PciDevice:
    """One device of ``query-pci`` with its BARs (bar index → (address, size))."""

    qdev_id: str
    bus: int
    slot: int
    function: int
    vendor: int
    device: int
    bars: dict[int, tuple[int, int]]

    @property
    def address(self) -> str:
        return f"0000:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


def flatten_pci(buses: list[dict[str, Any]]) -> list[PciDevice]:
    out: list[PciDevice] = []

    def walk(devices: list[dict[str, Any]], bus: int) -> None:
        for d in devices:
            bars = {int(r["bar"]): (int(r["address"]), int(r["size"])) for r in d.get("regions", [])
                    if "bar" in r and r.get("type") == "memory"}
            ident = d.get("id", {})
            out.append(PciDevice(d.get("qdev_id", ""), int(d.get("bus", bus)), int(d.get("slot", 0)),
                                 int(d.get("function", 0)), int(ident.get("vendor", 0)), int(ident.get("device", 0)),
                                 bars))
            bridge = d.get("pci_bridge")
            if bridge:
                walk(bridge.get("devices", []), int(bridge.get("bus", {}).get("secondary", 0)))

    for b in buses:
        walk(b.get("devices", []), int(b.get("bus", 0)))
    return out


class QmpSession:
    """One connection to one QEMU's QMP socket."""

    def __init__(self, name: str = "aperture") -> None:
        self._client = QMPClient(name)
        # qemu.qmp queues every event in a default listener that cannot be removed, and nothing here reads it:
        # with a STOP and a RESUME per remap, a 10-minute soak kept ~50 MiB of events. Waits use their own
        # listeners (wait_event), so the default one accepts nothing.
        self._client.events.event_filter = lambda event: False

    async def connect(self, socket_path: str, timeout: float = 10.0, alive: Any = None) -> None:
        """Connect, retrying while QEMU creates the socket. ``alive()`` returning False aborts early."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not os.path.exists(socket_path):  # not yet: qemu.qmp would log each failed attempt as an ERROR
                    raise FileNotFoundError(f"no socket {socket_path} yet")
                await self._client.connect(socket_path)
                return
            except (ConnectError, OSError) as exc:
                if alive is not None and not alive():
                    raise QemuGone("QEMU exited before its QMP socket accepted a connection") from exc
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to QMP at {socket_path}: {exc}") from exc
                await asyncio.sleep(0.02)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            err = getattr(exc.error, "error", None)
            desc = getattr(err, "desc", None) or str(exc)
            raise QmpError(f"QMP {command} failed: {desc}", getattr(err, "class_", None)) from exc
        except (QMPError, EOFError, OSError) as exc:
            raise QemuGone(f"QMP {command}: connection lost ({type(exc).__name__})") from exc

    async def version(self) -> str:
        v = (await self.execute("query-version"))["qemu"]
        return f"{v['major']}.{v['minor']}.{v['micro']}"

    async def memory_devices(self) -> list[MemoryDevice]:
        return [MemoryDevice.from_qmp(d) for d in await self.execute("query-memory-devices")]

    async def pci_devices(self) -> list[PciDevice]:
        return flatten_pci(await self.execute("query-pci"))

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def object_add(self, qom_type: str, obj_id: str, **props: Any) -> None:
        await self.execute("object-add", {"qom-type": qom_type, "id": obj_id, **props})

    async def object_del(self, obj_id: str) -> None:
        await self.execute("object-del", {"id": obj_id})

    async def device_add(self, driver: str, dev_id: str, **props: Any) -> None:
        await self.execute("device_add", {"driver": driver, "id": dev_id, **props})

    async def device_del(self, dev_id: str) -> None:
        await self.execute("device_del", {"id": dev_id})

    async def qom_list_properties(self, typename: str) -> list[str]:
        return [p["name"] for p in await self.execute("qom-list-properties", {"typename": typename})]

    async def memdevs(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-memdev"))

    async def commands(self) -> list[str]:
        return sorted(c["name"] for c in await self.execute("query-commands"))

    async def wait_event(self, name: str, timeout: float, trigger: Coroutine[Any, Any, Any] | None = None,
                         match: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``trigger`` (if any) while listening, and return the first ``name`` event whose data has ``match``."""
        def wanted(msg: Any) -> bool:
            data = msg.get("data", {})
            return all(data.get(k) == v for k, v in (match or {}).items())

        listener = EventListener(name, event_filter=wanted)
        with self._client.listen(listener):
            if trigger is not None:
                await trigger
            try:
                event = await asyncio.wait_for(listener.get(), timeout)
            except TimeoutError as exc:
                raise QmpError(f"no {name} event within {timeout:.1f} s") from exc
        return dict(event)

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection closing under us is the expected outcome."""
        try:
            await self._client.execute("quit")
        except (QMPError, EOFError, OSError):
            pass

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, EOFError, OSError):
            pass


class SyncQmpSession:
    """Runs a ``QmpSession`` on a private event loop thread so plain code (and tests) can call it.

    ``when_lost``: the one place a lost connection is explained — given the ``QemuGone``, it returns the error to
    raise instead (the VM says "QEMU died (signal 9)" once its process has exited), or None to keep it."""

    def __init__(self, name: str = "aperture",
                 when_lost: Callable[[QemuGone], Exception | None] | None = None) -> None:
        self.when_lost = when_lost
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self.session = self._run(self._make(name), 5.0)

    @staticmethod
    async def _make(name: str) -> QmpSession:
        return QmpSession(name)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError as exc:
            fut.cancel()
            raise QmpError(f"QMP call timed out after {timeout:.0f} s") from exc
        except QemuGone as exc:
            explained = self.when_lost(exc) if self.when_lost is not None else None
            if explained is not None:
                raise explained from exc
            raise

    def connect(self, socket_path: str, timeout: float = 10.0, alive: Any = None) -> None:
        self._run(self.session.connect(socket_path, timeout, alive), timeout + 5)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        return self._run(self.session.execute(command, arguments), timeout)

    def version(self) -> str:
        return self._run(self.session.version())

    def memory_devices(self) -> list[MemoryDevice]:
        return self._run(self.session.memory_devices())

    def pci_devices(self) -> list[PciDevice]:
        return self._run(self.session.pci_devices())

    def stop(self) -> None:
        self._run(self.session.stop())

    def cont(self) -> None:
        self._run(self.session.cont())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run any ``QmpSession`` coroutine, e.g. ``sync.call(sync.session.device_del("x"))``."""
        return self._run(coro, timeout)

    def quit(self) -> None:
        self._run(self.session.quit(), 10.0)

    def close(self) -> None:
        """Disconnect and stop the loop thread; safe to call twice."""
        if not self._loop.is_closed():
            try:
                self._run(self.session.close(), 5.0)
            except QmpError:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            self._loop.close()
