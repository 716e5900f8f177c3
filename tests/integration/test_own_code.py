"""Running the user's own code in the VM: `aperture run -- CMD` with --cwd/--share, and the guest shell."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import aperture_argv, interruptible, run_aperture

PROG = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv)
{
    printf("prog: hello from %s\n", argc > 1 ? argv[1] : "nobody");
    fflush(stdout);
    if (argc > 2 && !strcmp(argv[2], "kill"))
        raise(SIGKILL);
    fprintf(stderr, "prog: to stderr\n");
    return 0;
}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory with a shell script and a small C program built on the host (dynamic, glibc)."""
    d = tmp_path_factory.mktemp("proj")
    (d / "prog.c").write_text(PROG)
    subprocess.run(["gcc", "-O1", "-o", str(d / "prog"), str(d / "prog.c")], check=True)
    (d / "check.sh").write_text('#!/bin/sh\necho "check: in $(pwd)"\nexit "${1:-0}"\n')
    (d / "check.sh").chmod(0o755)
    return d


@pytest.mark.parametrize(("script", "want_rc", "want_out"), [
    ("./prog guest && ./check.sh 0", 0, "check: in "),
    ("./prog guest && ./check.sh 1", 1, "check: in "),
    ("./prog guest kill && ./check.sh 0", 137, "prog: hello from guest"),  # killed by SIGKILL: 128 + 9
])
def test_cwd_runs_the_projects_programs_and_exits_with_their_status(project: Path, script: str, want_rc: int,
                                                                    want_out: str) -> None:
    proc = run_aperture("run", "-q", "--cwd", "--", "sh", "-c", script, cwd=project, timeout=300)
    assert proc.returncode == want_rc, proc.stderr[-2000:]
    assert "prog: hello from guest" in proc.stdout and want_out in proc.stdout
    if want_rc != 137:
        assert f"check: in {project}" in proc.stdout  # started in the same path as on the host
        assert "prog: to stderr" in proc.stderr  # stderr stays stderr
    else:
        assert "check:" not in proc.stdout


def test_output_streams_as_it_comes_and_json_reports_the_command(project: Path) -> None:
    """The first line arrives while the command is still sleeping, not when it ends."""
    argv = aperture_argv() + ["run", "-q", "--json", "--", "sh", "-c", "echo first-line; sleep 4; echo second"]
    proc = subprocess.Popen(argv, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    first_at = None
    for line in proc.stderr:  # under --json the command's output goes to stderr, the JSON to stdout
        if "first-line" in line:
            first_at = time.monotonic()
            break
    out, _ = proc.communicate(timeout=300)
    ended = time.monotonic()
    assert first_at is not None and ended - first_at > 3, "output was not streamed"
    result = json.loads(out)
    assert result["command"]["rc"] == 0 and result["ok"] is True
    assert result["command"]["argv"] == ["sh", "-c", "echo first-line; sleep 4; echo second"]
    assert result["command"]["output_bytes"]["stdout"] == len("first-line\nsecond\n")
    assert result["command"]["duration_s"] >= 4
    assert [c["name"] for c in result["checks"]] == ["guest.dmesg"]  # no built-in checks without --checks
    assert result["checks"][0]["status"] == "pass"


def test_shares_read_write_and_read_only(tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "given.txt").write_text("from the host\n")
    script = ("cat /mnt/ro/given.txt && echo written-in-guest > /mnt/rw/out.txt && "
              "(echo nope > /mnt/ro/refused.txt; echo ro-rc=$?)")
    proc = run_aperture("run", "-q", "--share", f"{rw}:/mnt/rw", "--share", f"{ro}:/mnt/ro:ro", "--", "sh", "-c",
                        script, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "from the host" in proc.stdout
    assert (rw / "out.txt").read_text() == "written-in-guest\n"  # a write in the guest is seen on the host
    assert "ro-rc=1" in proc.stdout and "Read-only file system" in proc.stderr
    assert not (ro / "refused.txt").exists()


@pytest.mark.parametrize(("args", "text"), [
    (["--share", "/no/such/dir"], "--share: shared directory /no/such/dir does not exist"),
    (["--share", "/etc/hostname"], "not a directory"),
    (["--share", "/tmp:/proc/x"], "system directory"),
    (["--share", "/tmp:/bin"], "system directory"),
    (["--cwd"], "needs a command"),
])
def test_bad_shares_are_refused_in_one_line(args: list[str], text: str) -> None:
    proc = run_aperture("run", *args, *([] if args == ["--cwd"] else ["--", "true"]), timeout=60)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_shell_through_a_pty(tmp_path: Path) -> None:
    """`aperture shell NAME` as a person types: a command, Ctrl-C of a foreground job, exit."""
    import pexpect

    name = f"sh{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, APERTURE_STATE=str(tmp_path / "state"))
    up = run_aperture("up", name, "--run-dir", str(tmp_path / "run"), env=env, timeout=240)
    assert up.returncode == 0, up.stderr
    try:
        child = pexpect.spawn(aperture_argv()[0], aperture_argv()[1:] + ["shell", name], env=env,
                              encoding="utf-8", timeout=60, dimensions=(30, 100))
        child.expect(r"\[aperture /\]# ")
        child.sendline("echo hello-$((40 + 2)); stty size")
        child.expect("hello-42")
        child.expect("30 100")  # the window size came through
        child.expect(r"\[aperture /\]# ")
        child.sendline("sleep 100")
        time.sleep(1)
        child.sendcontrol("c")  # to the guest's foreground job, not to aperture
        child.expect(r"\[aperture /\]# ", timeout=20)
        child.sendline("echo after-ctrl-c-$?")
        child.expect("after-ctrl-c-130")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 3
        # The VM is still up: attach again, then detach with Ctrl-].
        again = pexpect.spawn(aperture_argv()[0], aperture_argv()[1:] + ["shell", name], env=env,
                              encoding="utf-8", timeout=60)
        again.expect(r"\[aperture /\]# ")
        again.sendcontrol("]")
        again.expect("detached")
        again.expect(pexpect.EOF)
        again.close()
        assert again.exitstatus == 0
        assert run_aperture("exec", name, "--", "true", env=env, timeout=60).returncode == 0
    finally:
        run_aperture("down", name, env=env, timeout=60)


def test_run_shell_stops_the_vm_when_the_shell_exits(tmp_path: Path) -> None:
    import pexpect

    from tests.conftest import qemu_processes

    run_dir = tmp_path / "run"
    child = pexpect.spawn(aperture_argv()[0], aperture_argv()[1:] + ["run", "--shell", "--run-dir", str(run_dir)],
                          encoding="utf-8", timeout=90)
    child.expect(r"\[aperture /\]# ")
    child.sendline("ls /dev/dax* && exit 5")  # DAX set up as for the checks
    child.expect("/dev/dax")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 5
    assert qemu_processes(str(run_dir)) == []


def test_ctrl_c_stops_the_command_and_the_vm(tmp_path: Path) -> None:
    import signal

    from tests.conftest import qemu_processes

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(aperture_argv() + ["run", "--run-dir", str(run_dir), "--", "sh", "-c",
                                               "echo started; sleep 100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    assert proc.stdout is not None
    assert "started" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert qemu_processes(str(run_dir)) == []
    assert not list(Path("/dev/shm").glob(f"aperture-*{proc.pid}*"))


def test_output_beyond_a_mebibyte_arrives_whole() -> None:
    proc = run_aperture("run", "-q", "--", "seq", "1", "300000", timeout=300)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout == "".join(f"{i}\n" for i in range(1, 300001))  # ~2 MB: more than exec keeps


def test_checks_run_first_once_each() -> None:
    proc = run_aperture("run", "-q", "--checks", "--json", "--", "true", timeout=300)
    result = json.loads(proc.stdout)
    names = [c["name"] for c in result["checks"]]
    assert proc.returncode == 0 and result["ok"], proc.stderr[-1000:]
    assert len(names) == len(set(names)) and {"nvdimm.present", "dax.fsdax", "aperture.window"} <= set(names)
