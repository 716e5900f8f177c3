"""guest.dmesg on real runs: a clean default run passes it; a module of the user's own that WARNs at load makes a
successful `run -- insmod` exit 1, with the report in the check's detail."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import checks_by_name, run_aperture

WARN_MODULE = """// SPDX-License-Identifier: GPL-2.0
#include <linux/bug.h>
#include <linux/module.h>

static int __init warnmod_init(void)
{
\tWARN(1, "aperture test: a warning on purpose\\n");
\treturn 0;
}

static void __exit warnmod_exit(void)
{
}

module_init(warnmod_init);
module_exit(warnmod_exit);
MODULE_DESCRIPTION("aperture test: WARN at load");
MODULE_LICENSE("GPL");
"""


def test_default_run_has_a_clean_kernel_log(default_run) -> None:
    check = checks_by_name(default_run[1])["guest.dmesg"]
    assert check["status"] == "pass", check
    assert check["detail"]["count"] == 0 and check["detail"]["scanned_bytes"] > 0


@pytest.fixture
def warnmod(tmp_path: Path, built_kernel) -> Path:
    """A module of the user's own, built as the README says (make -C the tree aperture kernel info names): it
    WARNs at load."""
    if built_kernel.build_dir is None or not (built_kernel.build_dir / "Makefile").is_file():
        pytest.skip("the built kernel's object tree is not in the cache")
    src = tmp_path / "warnmod"
    src.mkdir()
    (src / "warnmod.c").write_text(WARN_MODULE)
    (src / "Kbuild").write_text("obj-m := warnmod.o\n")
    make = subprocess.run(["make", "-C", str(built_kernel.build_dir), f"M={src}", "modules"],
                          capture_output=True, text=True, timeout=300)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-2000:]
    return src / "warnmod.ko"


def test_a_warning_from_the_users_module_fails_a_successful_command(tmp_path: Path, warnmod: Path) -> None:
    src = warnmod.parent
    proc = run_aperture("run", "-q", "--json", "--cwd", "--run-dir", str(tmp_path / "r"), "--", "insmod",
                        "./warnmod.ko", cwd=src, timeout=300)
    result = json.loads(proc.stdout)
    assert result["command"]["rc"] == 0, proc.stderr  # insmod itself succeeded ...
    assert proc.returncode == 1, proc.stderr  # ... but the kernel reported a warning: the run fails
    dmesg = checks_by_name(result)["guest.dmesg"]
    assert dmesg["status"] == "fail" and dmesg["detail"]["kinds"] == ["warning"], dmesg
    report = dmesg["detail"]["reports"][0]
    assert "warnmod" in "\n".join(report["lines"]) and report["header"].startswith("WARNING: CPU:")


def test_module_of_the_users_own_is_loaded_at_boot_and_its_warning_fails_the_run(tmp_path: Path,
                                                                                  warnmod: Path) -> None:
    """`--module FILE.ko` puts the user's module into the image, /init loads it after aperture's driver; its
    WARN at load is a guest.dmesg report, and the run exits 1."""
    proc = run_aperture("run", "-q", "--json", "--cold", "--module", str(warnmod), "--only", "guest.*",
                        "--run-dir", str(tmp_path / "r"), timeout=300)
    assert proc.returncode == 1, proc.stderr
    checks = checks_by_name(json.loads(proc.stdout))
    assert "guest.modules" not in checks, checks["guest.modules"]  # reported only when a module failed to load
    assert checks["guest.dmesg"]["status"] == "fail" and "warnmod" in json.dumps(checks["guest.dmesg"]["detail"])


UAF_MODULE = """// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
#include <linux/slab.h>

static int __init uafmod_init(void)
{
\tchar *volatile p = kmalloc(64, GFP_KERNEL);

\tif (!p)
\t\treturn -ENOMEM;
\tkfree(p);
\tpr_info("uafmod: %d\\n", p[8]);
\treturn 0;
}

static void __exit uafmod_exit(void)
{
}

module_init(uafmod_init);
module_exit(uafmod_exit);
MODULE_DESCRIPTION("aperture test: a use-after-free at load");
MODULE_LICENSE("GPL");
"""


def test_kasan_report_of_the_users_module_is_decoded_to_its_file_and_line(tmp_path: Path) -> None:
    """On the debug flavour: a module that reads freed memory at load makes guest.dmesg fail with the KASAN
    report, its stack decoded to a file:line of that module."""
    from aperture.guest.errors import SetupError
    from aperture.guest.kernel import built_kernel

    try:
        debug = built_kernel("debug")
    except SetupError:
        pytest.skip("no debug-flavour kernel in the cache (aperture kernel build --flavor debug)")
    assert debug.build_dir is not None
    src = tmp_path / "uafmod"
    src.mkdir()
    (src / "uafmod.c").write_text(UAF_MODULE)
    (src / "Kbuild").write_text("obj-m := uafmod.o\n")
    make = subprocess.run(["make", "-C", str(debug.build_dir), f"M={src}", "modules"], capture_output=True,
                          text=True, timeout=300)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-2000:]
    proc = run_aperture("run", "-q", "--json", "--kernel", "built-debug", "--module", str(src / "uafmod.ko"),
                        "--only", "guest.*", "--run-dir", str(tmp_path / "r"), timeout=600)
    assert proc.returncode == 1, proc.stderr
    dmesg = checks_by_name(json.loads(proc.stdout))["guest.dmesg"]
    assert "kasan" in dmesg["detail"]["kinds"], dmesg
    kasan = next(r for r in dmesg["detail"]["reports"] if r["kind"] == "kasan")
    assert kasan["header"].startswith("BUG: KASAN: slab-use-after-free in uafmod_init"), kasan["header"]
    assert any("uafmod.c:" in line for line in kasan["decoded"]), kasan["decoded"]
