"""pytest plugin (entry point ``pytest11: aperture``): boot aperture VMs from a user's own tests.

    @pytest.mark.aperture(pmem=["256M:devdax"], devices=2)
    def test_dma(aperture_vm):
        aperture_vm.map(0, 1, 5)                       # host side, VM paused around it
        r = aperture_vm.exec("aperture-helper peek 0 1 0 16")
        assert r.rc == 0

Every VM gets its own name, run directory (under the test's tmp_path), sockets and shm files, so
``pytest -n auto`` runs several at once. The VM is torn down even when the test fails; a failing test's
report carries the guest console tail and the run directory.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aperture.emulator.runs.kernel_log import kernel_log_check
from aperture.emulator.runs.results import Check, summary_line
from aperture.emulator.selection import CheckSelection
from aperture.emulator.spec import VM_OPTIONS, VmOptionError, VmSpec
from aperture.emulator.vm.machine import Vm
from aperture.emulator.vm.warm import ready_vm
from aperture.guest.abi import MsgType
from aperture.guest.errors import ConfigError, GuestError


@dataclass(frozen=True)
class ExecResult:
    rc: int
    output: str


class ApertureVM:
    """A booted guest (helper serving commands), its QMP session and its host-side device models."""

    def __init__(self, vm: Vm, start: str = "cold", selection: CheckSelection | None = None) -> None:
        self.vm = vm
        self.checks: list[Check] = []
        #: The marker's only=/skip=: which checks run_scenario runs by default
        self.selection = selection or CheckSelection()
        #: "restore" (from the warm-start snapshot) or "cold"
        self.start = start

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def run_dir(self) -> Path:
        return self.vm.paths.run_dir

    @property
    def qmp(self) -> Any:
        """Synchronous QMP (``execute(cmd, args)``, ``stop()``, ``cont()``, ``pci_devices()``, ...)."""
        return self.vm.qmp

    @property
    def devices(self) -> list[Any]:
        """The host-side ``ApertureDevice`` objects (device memory, window, DMA engine, stats)."""
        return self.vm.service.devices if self.vm.service else []

    def exec(self, command: str, timeout: float = 120.0, cwd: str | None = None) -> ExecResult:
        """Run a shell command in the guest (busybox sh; ``aperture-helper`` tools are on PATH), in ``cwd``."""
        return ExecResult(*self.vm.exec(command, timeout, cwd=cwd))

    def run_scenario(self, name: str = "aperture", timeout: float = 300.0, only: tuple[str, ...] | None = None,
                     skip: tuple[str, ...] | None = None) -> dict[str, Check]:
        """Run a helper scenario (default, nvdimm, dax, aperture) in the live guest; its checks by name. ``only``
        and ``skip`` (globs; default: the marker's) select the checks, as ``aperture run --only/--skip`` do."""
        selection = CheckSelection(self.selection.only if only is None else tuple(only),
                                   self.selection.skip if skip is None else tuple(skip))
        self.vm.command({"env": " ".join(f"{k}={v}" for k, v in selection.guest_env().items())}, 10)
        done, seen = self.vm.command({"scenario": name}, timeout)
        if done.get("rc") != 0:
            raise GuestError(f"scenario {name!r}: {done.get('output')}")
        found = (Check.from_message(m) for m in seen if m.get("type") == MsgType.CHECK)
        checks = {c.name: c for c in found if c is not None}
        self.checks.extend(checks.values())
        return checks

    def map(self, device: int, slot: int, page: int | None) -> float:
        """Host-driven (pause-mode) remap of one slot; ``page=None`` unmaps. Returns milliseconds."""
        from aperture.qmp_client.remap import pause_retarget

        assert self.vm.qmp is not None
        return pause_retarget(self.vm.qmp, self.devices[device], {slot: page})

    def results(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": str(self.run_dir), "ok": all(c.ok for c in self.checks),
                "checks": [{"name": c.name, "ok": c.ok, "status": c.status, "detail": c.detail}
                           for c in self.checks]}

    def console_tail(self, lines: int = 40) -> str:
        return self.vm.console_tail(lines)


#: Every check the session's VMs ran, for --aperture-ktap.
_KTAP_CHECKS = pytest.StashKey[list[Check]]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("aperture_ktap", None)
    if path:
        from aperture.emulator.runs.results import ktap

        Path(path).write_text(ktap(session.config.stash.get(_KTAP_CHECKS, [])))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aperture", "aperture VMs")
    group.addoption("--aperture-kernel", default=None, help="guest kernel: built (default), debian, or a path")
    group.addoption("--aperture-modules", default=None, help="modules directory for --aperture-kernel")
    group.addoption("--aperture-accel", default=None, choices=["auto", "kvm", "tcg"])
    group.addoption("--aperture-cold", action="store_true", default=False,
                    help="boot every VM instead of restoring its warm-start snapshot")
    group.addoption("--aperture-ktap", default=None, metavar="PATH",
                    help="write every check the tests' VMs ran (run_scenario) to PATH as KTAP version 1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "aperture(pmem=['256M:devdax'], devices=2 | ['aperture,mem=64M'], nvme='none', memory='512M', "
        "boot_timeout=60, append=['loglevel=7'], guest_bins=['/usr/bin/strace'], shares=['HOSTDIR[:GUESTDIR][:ro]'], "
        "kernel='debian', ...): the VM the aperture_vm fixture boots — every VM option of `aperture run`, by its "
        f"name ({', '.join(o.name for o in VM_OPTIONS)}), with the same defaults; only=['dax.*'], skip=[...]: the "
        "checks run_scenario runs")


def _selection_from_marker(marker: pytest.Mark | None) -> CheckSelection:
    kw = marker.kwargs if marker else {}
    return CheckSelection(tuple(kw.get("only", ())), tuple(kw.get("skip", ())))


#: A fixture's VM lives as long as its test: no run timeout unless the marker gives one (timeout=SECONDS).
FIXTURE_RUN_TIMEOUT = 24 * 3600.0


def _spec_from_marker(marker: pytest.Mark | None, opts: Any) -> VmSpec:
    """The marker's keywords are the VM options of `aperture run` (spec.py VM_OPTIONS: same names, same parsing,
    same defaults); --aperture-kernel/--aperture-modules/--aperture-accel fill in what the marker leaves out."""
    kw = {k: v for k, v in (marker.kwargs if marker else {}).items() if k not in ("only", "skip")}
    defaults = {"kernel": opts.aperture_kernel, "modules": opts.aperture_modules, "accel": opts.aperture_accel,
                "timeout": FIXTURE_RUN_TIMEOUT}
    try:
        return VmSpec.from_options({**{k: v for k, v in defaults.items() if v is not None}, **kw})
    except VmOptionError as exc:
        raise pytest.UsageError(f"aperture marker {exc.option.name}=: {exc.one_line()}") from exc
    except ConfigError as exc:
        raise pytest.UsageError(f"aperture marker: {exc.one_line()}") from exc


@pytest.fixture(scope="session")
def _aperture_boot_inputs(request: pytest.FixtureRequest) -> dict[Any, Any]:
    return {}


@pytest.fixture
def aperture_vm(request: pytest.FixtureRequest, tmp_path: Path, _aperture_boot_inputs: dict[Any, Any]
                ) -> Iterator[ApertureVM]:
    """A booted VM configured by the test's ``@pytest.mark.aperture(...)``; torn down after the test."""
    from aperture.emulator.runs.run import prepare

    opts = request.config.option
    marker = request.node.get_closest_marker("aperture")
    spec = _spec_from_marker(marker, opts)
    config = spec.config
    selection = _selection_from_marker(marker)
    # one image per kernel choice, accelerator and set of extra binaries
    key = (spec.kernel, spec.modules, spec.kernel_config, config.accel, config.guest_bins)
    if key not in _aperture_boot_inputs:
        _aperture_boot_inputs[key] = prepare(spec, lambda s: None)
    inputs = _aperture_boot_inputs[key]
    name = f"pytest-{uuid.uuid4().hex[:10]}"
    # Restored from the VM's warm-start snapshot (made by the first test that needs it) unless --aperture-cold.
    with ready_vm(config, inputs, tmp_path / "aperture", lambda s: None, cold=opts.aperture_cold,
                  name=name) as (vm, info):
        handle = ApertureVM(vm, info.start, selection)
        request.node._aperture_vm = handle
        try:
            yield handle
        finally:
            request.config.stash.setdefault(_KTAP_CHECKS, []).extend(handle.checks)
    # After the VM is gone: the guest kernel's own reports (WARNING, BUG, KASAN, lockdep, ...) fail the test.
    dmesg = kernel_log_check(vm.paths.console, inputs.kernel, config.user_modules)
    handle.checks.append(dmesg)
    request.config.stash.setdefault(_KTAP_CHECKS, []).append(dmesg)
    if not dmesg.ok:
        pytest.fail(f"guest.dmesg: {summary_line(dmesg.name, dmesg.detail)} (console: {vm.paths.console})",
                    pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    handle = getattr(item, "_aperture_vm", None)
    if handle is not None and report.failed:
        try:
            report.sections.append(("aperture console tail", handle.console_tail(40)))
        except OSError:
            pass
        report.sections.append(("aperture run dir", str(handle.run_dir)))
