"""VmSpec: one table of VM options that the CLI, the pytest marker and the daemon spec all parse into."""

import json
from pathlib import Path

import click
import pytest
from aperture.emulator.config import DEFAULT_DEVICES, DEFAULT_PMEM
from aperture.emulator.frontend import cli
from aperture.emulator.runpaths import RunPaths
from aperture.emulator.spec import VM_OPTIONS, VmOptionError, VmSpec
from aperture.emulator.vm.qemu_argv import build_argv
from aperture.guest.errors import ConfigError
from aperture.guest.kernelspec import KernelSpec


def test_defaults_live_in_the_table() -> None:
    spec = VmSpec.from_options({})
    assert spec.config.pmem == DEFAULT_PMEM and spec.config.devices == DEFAULT_DEVICES
    assert (spec.config.memory, spec.config.nvme, spec.config.boot_timeout, spec.config.run_timeout) == \
        (512 << 20, 64 << 20, 60.0, 120.0)
    assert spec.kernel is None and spec.config.smp == 1


def test_marker_style_values_parse_like_the_cli() -> None:
    text = VmSpec.from_options({"pmem": ("512M:devdax",), "devices": ("aperture,mem=64M",), "nvme": "none",
                                "timeout": "30", "smp": "2", "append": ("loglevel=7",)})
    native = VmSpec.from_options({"pmem": ["512M:devdax"], "devices": ["aperture,mem=64M"], "nvme": "none",
                                  "timeout": 30, "smp": 2, "append": "loglevel=7"})
    assert text == native
    assert VmSpec.from_options({"devices": 0}).config.devices == ()
    assert VmSpec.from_options({"devices": ("none",)}).config.devices == ()


def test_bad_values_say_which_option_without_naming_a_flag() -> None:
    with pytest.raises(VmOptionError) as err:
        VmSpec.from_options({"pmem": ["7M"]})
    assert err.value.option.name == "pmem" and "--" not in err.value.message
    with pytest.raises(ConfigError, match="unknown VM option frobs"):
        VmSpec.from_options({"frobs": 1})


def test_dict_round_trip_is_exact(tmp_path: Path) -> None:
    spec = VmSpec.from_options({"shares": [f"{tmp_path}:/work:ro"], "guest_bins": ["/bin/true"], "kernel": "debian",
                                "devices": ["aperture,mem=64M,hidden=48M-64M"], "force": True})
    assert VmSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_new_option_reaches_qemu(tmp_path: Path) -> None:
    """--smp: one row in VM_OPTIONS; qemu_argv already puts VmConfig.smp on the command line."""
    spec = VmSpec.from_options({"smp": "2"})
    paths = RunPaths(tmp_path, "x", tmp_path, tmp_path)
    argv = build_argv("qemu", spec.config, KernelSpec(tmp_path / "k", None, "6.1"), tmp_path / "i", paths, "tcg",
                      "quiet")
    assert argv[argv.index("-smp") + 1] == "2"


@pytest.mark.parametrize("command", ["run", "up", "bench boot", "bench dax", "bench device", "bench driver",
                                     "bench remap", "bench share", "bench soak"])
def test_every_vm_command_has_every_vm_option(command: str) -> None:
    group: click.Group = cli.cli
    cmd: click.Command = group
    for part in command.split():
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[part]
    flags = {opt for p in cmd.params for opt in p.opts}
    assert {o.flag for o in VM_OPTIONS} <= flags


@pytest.mark.parametrize(("args", "gdb"), [(["--gdb", "wait", "-q"], "wait"), (["--gdb", "-q"], "on"),
                                           (["--gdb"], "on"), ([], None)])
def test_gdb_takes_an_optional_value(args: list[str], gdb: str | None) -> None:
    cmd = cli.cli.commands["up"]  # type: ignore[attr-defined]
    ctx = cmd.make_context("up", ["x", *args], resilient_parsing=True)
    assert ctx.params.get("gdb") == gdb and ctx.params.get("name") == "x"
