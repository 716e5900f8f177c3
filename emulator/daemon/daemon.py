"""The process behind ``aperture up``: owns one VM (QEMU + device model) until ``aperture down``.

It records itself in the state directory, serves domain commands on a control socket (window show/map/unmap,
memmap, dma stats, remap start/stop, exec in the guest, shutdown) and leaves a second QMP monitor free for users.
Usage (internal): ``python -m emulator.daemon SPEC.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aperture.emulator.config import VmConfig, config_from_dict
from aperture.emulator.daemon.registry import (
    VmRecord,
    read_record,
    reap_orphan,
    remove_record,
    remove_shm,
    write_record,
)
from aperture.emulator.model.addrmap import DmaFault
from aperture.emulator.runpaths import default_sock_dir
from aperture.emulator.vm.machine import Vm, VmBoot
from aperture.emulator.vm.warm import restore_vm
from aperture.guest.abi import MsgType, Phase
from aperture.guest.errors import ApertureError, ConfigError, GuestError
from aperture.guest.kernelspec import KernelSpec
from aperture.qmp_client.remap import RemapController, pause_retarget


class Daemon:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.stop = threading.Event()
        self.vm: Vm | None = None
        self.remapper: RemapController | None = None
        self.record: VmRecord | None = None
        # One reader of the guest's results channel at a time: the main loop's poll, or a guest command.
        self.guest_lock = threading.Lock()
        self.control_lock = threading.Lock()  # the other control commands, one at a time

    # ------------------------------------------------------------------ domain commands
    def _device(self, dev: Any) -> Any:
        assert self.vm is not None and self.vm.service is not None
        devices = self.vm.service.devices
        try:
            index = int(dev)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"device must be a number, got {dev!r}") from exc
        if not 0 <= index < len(devices):
            raise ConfigError(f"no device {index} (this VM has {len(devices)})")
        return devices[index]

    def _remap(self, dev: Any, moves: dict[int, int | None]) -> dict[str, Any]:
        device = self._device(dev)
        assert self.vm is not None and self.vm.qmp is not None
        try:
            ms = pause_retarget(self.vm.qmp, device, moves)
        except DmaFault as fault:
            raise ConfigError(fault.why) from fault
        return {"latency_ms": round(ms, 3), "slots": device.window.slots}

    @staticmethod
    def _parse_int(value: Any, what: str) -> int:
        try:
            return int(str(value), 0)
        except ValueError as exc:
            raise ConfigError(f"{what} must be a number, got {value!r}") from exc

    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        assert self.vm is not None
        service = self.vm.service
        if cmd == "status":
            return {"name": self.spec["name"], "state": self.record.state if self.record else "?",
                    "qemu": self.vm.qmp.call(self.vm.qmp.session.status()) if self.vm.qmp else None,
                    "remapping": self.remapper is not None}
        if cmd == "shutdown":
            self.stop.set()
            return "shutting down"
        if cmd == "exec":
            command = args.get("command")
            if not isinstance(command, str) or not command.strip() or len(command.encode()) > 4000:
                raise ConfigError("exec needs a shell command of at most 4000 bytes")
            if self.record is None or self.record.state != "ready":
                raise GuestError("the guest is not ready yet")
            with self.guest_lock:
                rc, output = self.vm.exec(command, timeout=float(args.get("timeout_s", 120)))
            return {"rc": rc, "output": output}
        if service is None:
            raise ConfigError("this VM has no aperture devices")
        if cmd == "window.show":
            devs = [self._device(args["dev"])] if args.get("dev") is not None else service.devices
            return [{"device": d.index, "slot_size": d.config.slot, "nr_slots": d.config.nr_slots,
                     "pages": d.config.nr_pages, "hidden": [list(h) for h in d.config.hidden],
                     "generation": d.ctl.get("GENERATION"), "slots": d.window.slots} for d in devs]
        if cmd == "window.map":
            slot, page = self._parse_int(args.get("slot"), "slot"), self._parse_int(args.get("page"), "page")
            return self._remap(args.get("dev"), {slot: page})
        if cmd == "window.unmap":
            return self._remap(args.get("dev"), {self._parse_int(args.get("slot"), "slot"): None})
        if cmd == "memmap":
            service.invalidate_map()
            amap = service.address_map()
            if amap is None:
                raise GuestError(f"no address map: {service.map_error or 'QMP is unavailable'}")
            return amap.describe()
        if cmd == "dma.stats":
            return service.stats()
        if cmd == "remap.start":
            if self.remapper is not None:
                raise ConfigError("already remapping; 'remap stop' first")
            every = float(args.get("every", 0.02))
            if not 0.001 <= every <= 60:
                raise ConfigError("remap interval must be between 1ms and 60s")
            assert self.vm.qmp is not None
            self.remapper = RemapController(self.vm.qmp, service.devices, every)
            self.remapper.start()
            return f"remapping every {every * 1e3:g} ms"
        if cmd == "remap.stop":
            if self.remapper is None:
                raise ConfigError("not remapping")
            stats, self.remapper = self.remapper.stop(), None
            return stats.summary()
        raise ConfigError(f"unknown command {cmd!r}")

    def serve_control(self, path: Path) -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        srv.bind(str(path))
        srv.listen(8)
        srv.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            # One thread per request: a long guest command must not hold up `down` or a window map.
            threading.Thread(target=self._serve_one, args=(conn,), name="aperture-control", daemon=True).start()
        srv.close()
        path.unlink(missing_ok=True)

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                buf = b""
                while not buf.endswith(b"\n") and len(buf) < 1 << 16:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf or b"{}")
                cmd, args = str(req.get("cmd")), dict(req.get("args") or {})
                if cmd == "exec":  # serialised by guest_lock instead
                    result = self.handle(cmd, args)
                else:
                    with self.control_lock:
                        result = self.handle(cmd, args)
                reply = {"ok": True, "result": result}
            except ApertureError as exc:
                reply = {"ok": False, "error": exc.one_line(), "exit_code": exc.exit_code}  # keeps its category
            except Exception as exc:  # noqa: BLE001 - a bad request must not kill the VM
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    # ------------------------------------------------------------------ lifecycle
    def _start(self, stack: contextlib.ExitStack, spec: dict[str, Any], config: VmConfig, kernel: KernelSpec,
               name: str) -> Vm:
        """The VM, restored from the snapshot `aperture up` found or made (spec["snapshot"]); booted cold when
        there is none or the restore fails (said on the daemon's log)."""
        boot = VmBoot(kernel, Path(spec["initrd"]), spec["qemu"], spec["accel"])
        run_dir = Path(spec["run_dir"])
        snapshot = spec.get("snapshot")
        if snapshot:
            vm, failed = restore_vm(stack, config, boot, Path(snapshot), None, run_dir=run_dir, name=name,
                                    user_qmp=True)
            if vm is not None:
                return vm
            print(f"{name}: restoring {Path(snapshot).parent.name} failed ({failed}): booting cold", flush=True)
        return stack.enter_context(Vm(config, boot, run_dir=run_dir, scenario="idle", name=name, user_qmp=True))

    def run(self) -> int:
        spec = self.spec
        config = config_from_dict(spec["config"])
        kernel = KernelSpec.from_dict(spec["kernel"])
        name = spec["name"]
        with contextlib.ExitStack() as stack:
            vm = self._start(stack, spec, config, kernel, name)
            self.vm = vm
            assert vm.process is not None
            self.record = VmRecord(name=name, pid=os.getpid(), qemu_pid=vm.process.pid, accel=spec["accel"],
                                   started=time.time(), run_dir=str(vm.paths.run_dir),
                                   qmp_socket=str(vm.paths.user_qmp_socket),
                                   control_socket=str(vm.paths.control_socket), kernel_release=kernel.release)
            write_record(self.record)
            ctl = threading.Thread(target=self.serve_control, args=(vm.paths.control_socket,), daemon=True)
            ctl.start()
            try:
                if vm.incoming is None:
                    for msg in vm.messages(run_timeout=float("inf"), should_stop=self.stop.is_set):
                        if msg.get("type") == MsgType.PHASE and msg.get("name") == Phase.IDLE:
                            break
                    else:
                        return 0  # stopped (or the guest finished) before it became ready
                    print(f"{name}: guest ready after {vm.boot_s:.2f} s", flush=True)
                else:
                    print(f"{name}: guest restored in {vm.restore_s or 0:.2f} s, ready after "
                          f"{time.monotonic() - vm.started_at:.2f} s", flush=True)
                self.record.state = "ready"
                write_record(self.record)
                while not self.stop.is_set():  # from here on: poll (panic, death) between guest commands
                    if self.guest_lock.acquire(timeout=0.1):
                        try:
                            if any(m.get("type") == MsgType.DONE for m in vm.poll()):
                                return 0
                        finally:
                            self.guest_lock.release()
                    self.stop.wait(0.1)
            finally:
                self.record.state = "stopping"
                write_record(self.record)
                self.stop.set()
                if self.remapper is not None:
                    self.remapper.stop()
                ctl.join(5)
        return 0


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    daemon = Daemon(spec)
    try:
        return daemon.run()
    except KeyboardInterrupt:
        return 0
    except ApertureError as exc:
        print(f"aperture daemon: {exc.one_line()}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        remove_record(spec["name"])


def supervise(argv: list[str]) -> int:
    """Run the daemon in a child and, whatever ends it (kill -9 included), remove what it leaves: its QEMU (which
    dies with it anyway), sockets and record — at once, not at the next ``aperture ls``."""
    spec = json.loads(Path(argv[0]).read_text())
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # `down` stops the daemon; this one only outlives it to clean up
    _, status = os.waitpid(pid, 0)
    rec = read_record(spec["name"])
    if rec is not None and rec.pid == pid:
        reap_orphan(rec)
        remove_record(spec["name"])
    # The shm files exist before any record does (a daemon killed while QEMU starts or restores): they are named
    # after the VM, so they go too — unless a new daemon of that name is already up.
    if rec is None or rec.pid == pid or not rec.alive():
        remove_shm(spec["name"])
    shutil.rmtree(default_sock_dir(spec["name"]), ignore_errors=True)
    if os.WIFSIGNALED(status):
        print(f"aperture daemon: killed by signal {os.WTERMSIG(status)}; cleaned up after it", flush=True)
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--supervise"]:
        sys.exit(supervise(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
