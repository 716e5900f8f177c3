"""The built guest kernel: fragment, cache key, olddefconfig check, and which modules a kernel really needs."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from aperture.guest.errors import SetupError
from aperture.guest.image import GUEST_FEATURES, plan_modules
from aperture.guest.kbuild import (
    FragmentOption,
    build_key,
    dropped_options,
    fragment_hash,
    parse_config,
    read_fragment,
)
from aperture.guest.kernel import embedded_config, read_builtin, resolve_kernel
from aperture.guest.kernelspec import KernelSpec


def test_the_fragment_has_every_option_the_project_depends_on() -> None:
    names = {o.name: o.value for o in read_fragment()}
    for wanted in ("CONFIG_PCI_P2PDMA", "CONFIG_DEVICE_PRIVATE", "CONFIG_HMM_MIRROR", "CONFIG_ZONE_DEVICE",
                   "CONFIG_PVH", "CONFIG_IKCONFIG", "CONFIG_BLK_DEV_NVME", "CONFIG_FS_DAX", "CONFIG_DEV_DAX"):
        assert names[wanted] == "y", wanted
    assert names["CONFIG_TEST_HMM"] == "m"
    assert all(o.why for o in read_fragment())


def test_fragment_lines_need_a_reason(tmp_path: Path) -> None:
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y  # because\nCONFIG_B=m\n")
    with pytest.raises(SetupError, match="CONFIG_B has no comment"):
        read_fragment(frag)
    frag.write_text("CONFIG_A=y # because\nnonsense\n")
    with pytest.raises(SetupError, match=":2: expected"):
        read_fragment(frag)


def test_fragment_hash_ignores_comments_but_not_values(tmp_path: Path) -> None:
    a = [FragmentOption("CONFIG_A", "y", "one reason")]
    b = [FragmentOption("CONFIG_A", "y", "another reason")]
    c = [FragmentOption("CONFIG_A", "m", "one reason")]
    assert fragment_hash(a) == fragment_hash(b) != fragment_hash(c)


def test_build_key_changes_with_each_input() -> None:
    base = build_key("6.12.117-1", "f1", "gcc 12.2.0")
    assert base == build_key("6.12.117-1", "f1", "gcc 12.2.0")
    assert len({base, build_key("6.12.118-1", "f1", "gcc 12.2.0"), build_key("6.12.117-1", "f2", "gcc 12.2.0"),
                build_key("6.12.117-1", "f1", "gcc 14.2.0")}) == 4


def test_dropped_options_are_named() -> None:
    options = [FragmentOption("CONFIG_A", "y", "x"), FragmentOption("CONFIG_B", "m", "x"),
               FragmentOption("CONFIG_C", "y", "x")]
    config = parse_config("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n")
    assert dropped_options(options, config) == ["CONFIG_B=m (now: y)", "CONFIG_C=y (now: n)"]


def _kernel(tmp_path: Path, config: str | None, modules: dict[str, bytes] | None = None,
            builtin: list[str] | None = None) -> tuple[KernelSpec, dict[str, str]]:
    mods = None
    if modules is not None or builtin is not None:
        mods = tmp_path / "lib/modules/6.12.0"
        (mods / "kernel").mkdir(parents=True)
        if builtin is not None:
            (mods / "modules.builtin").write_text("".join(f"kernel/drivers/{b}.ko\n" for b in builtin))
        for name, data in (modules or {}).items():
            (mods / "kernel" / f"{name}.ko").write_bytes(data)
    return (KernelSpec(tmp_path / "vmlinux", mods, "6.12.0", None, "user", read_builtin(mods)),
            parse_config(config) if config is not None else {})


ALL_BUILT_IN = "".join(f"{f.option}=y\n" for f in GUEST_FEATURES)


def test_a_monolithic_kernel_needs_no_modules(tmp_path: Path) -> None:
    kernel, kconfig = _kernel(tmp_path, ALL_BUILT_IN)
    plan = plan_modules(kernel, kconfig)
    assert plan.load == () and "libnvdimm" in plan.builtin and plan.absent == ()


def test_modules_builtin_stands_in_for_a_config(tmp_path: Path) -> None:
    kernel, kconfig = _kernel(tmp_path, None, builtin=[f.module for f in GUEST_FEATURES if f.required])
    plan = plan_modules(kernel, kconfig)
    optional = tuple(f.module for f in GUEST_FEATURES if not f.required)
    assert "test_hmm" in optional and "9p" in optional
    assert plan.load == () and plan.absent == optional  # optional features without a config: left out


def test_a_module_listed_in_the_config_as_m_must_be_there(tmp_path: Path) -> None:
    kernel, kconfig = _kernel(tmp_path, ALL_BUILT_IN.replace("CONFIG_LIBNVDIMM=y", "CONFIG_LIBNVDIMM=m"))
    with pytest.raises(SetupError, match="has CONFIG_LIBNVDIMM=m .*name its modules directory"):
        plan_modules(kernel, kconfig)


def test_a_missing_feature_names_the_option(tmp_path: Path) -> None:
    kernel, kconfig = _kernel(tmp_path, ALL_BUILT_IN.replace("CONFIG_ACPI_NFIT=y\n", ""))
    with pytest.raises(SetupError, match="lacks CONFIG_ACPI_NFIT .*turn it on"):
        plan_modules(kernel, kconfig)


def test_no_config_and_no_modules_asks_for_modules(tmp_path: Path) -> None:
    kernel, kconfig = _kernel(tmp_path, None)
    with pytest.raises(SetupError, match="no modules found for kernel 6.12.0: name its modules directory"):
        plan_modules(kernel, kconfig)


def test_an_optional_feature_the_kernel_lacks_is_left_out(tmp_path: Path) -> None:
    kernel, kconfig = _kernel(tmp_path, ALL_BUILT_IN.replace("CONFIG_TEST_HMM=y", "# CONFIG_TEST_HMM is not set"))
    assert plan_modules(kernel, kconfig).absent == ("test_hmm",)


def test_ikconfig_is_read_from_an_elf_kernel(tmp_path: Path) -> None:
    blob = gzip.compress(b"CONFIG_LIBNVDIMM=y\n# CONFIG_TEST_HMM is not set\n")
    image = tmp_path / "vmlinux"
    image.write_bytes(b"\x7fELF" + b"\0" * 100 + b"IKCFG_ST" + blob + b"IKCFG_ED" + b"\0" * 10)
    text = embedded_config(image)
    assert text is not None and parse_config(text) == {"CONFIG_LIBNVDIMM": "y", "CONFIG_TEST_HMM": "n"}
    image.write_bytes(b"\x7fELF" + b"\0" * 100)
    assert embedded_config(image) is None


def test_kernel_keywords_and_bad_paths(tmp_path: Path) -> None:
    from aperture.guest.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a kernel build tree"):
        resolve_kernel(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        resolve_kernel(tmp_path / "nope")
    with pytest.raises(ConfigError, match="a modules directory and a config go with a kernel file"):
        resolve_kernel("built", modules=tmp_path)
