"""Long-lived VMs as a person uses them in a terminal: up, ls, qmp (through a pty), console, down."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pexpect
import pytest

from tests.conftest import aperture_argv, qemu_processes, run_aperture


@pytest.fixture(scope="module")
def live_vm(tmp_path_factory: pytest.TempPathFactory):
    """One VM shared by the read-mostly interactive tests; always taken down."""
    state = tmp_path_factory.mktemp("state")
    env = {"APERTURE_STATE": str(state)}
    name = f"t{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path_factory.mktemp("up") / name
    proc = run_aperture("up", name, "--run-dir", str(run_dir), "--guest-bin", "/usr/bin/stat", env=env, timeout=240)
    try:
        assert proc.returncode == 0, proc.stderr
        yield name, env, run_dir
    finally:
        run_aperture("down", name, env=env, timeout=120)


def _spawn(args: list[str], env: dict[str, str]) -> pexpect.spawn:
    argv = aperture_argv() + args
    return pexpect.spawn(argv[0], argv[1:], env=dict(os.environ, **env), encoding="utf-8", timeout=60,
                         dimensions=(40, 160))


def test_up_and_ls(live_vm) -> None:
    name, env, run_dir = live_vm
    proc = run_aperture("ls", "--json", env=env)
    assert proc.returncode == 0
    rec = next(r for r in json.loads(proc.stdout) if r["name"] == name)
    assert rec["state"] == "ready" and rec["accel"] in ("tcg", "kvm")
    assert Path(rec["run_dir"]) == run_dir.resolve()
    assert qemu_processes(str(run_dir))
    human = run_aperture("ls", env=env).stdout
    assert name in human and "ready" in human


def test_interactive_shell_through_a_pty(live_vm) -> None:
    name, env, _ = live_vm
    sh = _spawn(["qmp", name], env)
    prompt = f"({name}) "
    sh.expect_exact(prompt)
    sh.sendline("query-status")
    sh.expect('"running"')
    sh.expect_exact(prompt)
    sh.sendline("query-versi\t")  # tab completion from query-commands
    sh.expect('"qemu"')
    sh.expect_exact(prompt)
    sh.sendline("window map 0 3 7")
    sh.expect("remapped in")
    sh.expect("3:7")
    sh.expect_exact(prompt)
    sh.sendline("window show 0")
    sh.expect("slot 3: page 7")
    sh.expect_exact(prompt)
    sh.sendline("window map 0 4 7")  # one page, two slots: refused, shell carries on
    sh.expect("error: page 7 would be live in two slots")
    sh.expect_exact(prompt)
    sh.sendline("no-such-command")
    sh.expect("error: unknown command")
    sh.expect_exact(prompt)
    sh.sendline("device_del")
    sh.expect("error: QMP device_del failed")
    sh.expect_exact(prompt)
    sh.sendline('query-pci x="unterminated')
    sh.expect("error: malformed arguments")
    sh.expect_exact(prompt)
    sh.sendline("memmap")
    sh.expect("aperture0-win BAR2")
    sh.expect_exact(prompt)
    sh.sendline("window unmap 0 3")
    sh.expect("remapped in")
    sh.expect("3:-")
    sh.expect_exact(prompt)
    sh.sendline("quit")
    sh.expect(pexpect.EOF)
    sh.close()
    assert "Traceback" not in (sh.before or "")


def test_scripted_shell_json_and_remaps(live_vm) -> None:
    name, env, _ = live_vm
    script = "query-version\nremap start 20ms\n" + "query-status\n" * 3 + "dma stats\n"
    proc = run_aperture("qmp", name, "--json", env=env, timeout=120, input=script)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, proc.stderr
    assert lines[0]["return"]["qemu"]["major"] >= 7
    assert all(line["ok"] for line in lines)
    import time

    time.sleep(1.0)
    stop = run_aperture("qmp", name, "--json", env=env, timeout=120, input="remap stop\n")
    summary = json.loads(stop.stdout)["return"]
    assert summary["mode"] == "pause" and summary["remaps"] >= 5 and summary["errors"] == []


@pytest.mark.parametrize(("script", "text"), [
    ("query-version\nno-such-command\n", "unknown command 'no-such-command'"),
    ("device_add driver=\"unbalanced\n", "malformed arguments"),
    ("transaction(\n", "nothing of it was sent"),
])
def test_scripted_shell_bad_lines_exit_2(live_vm, script: str, text: str) -> None:
    """Bad usage in a QMP script exits 2 (the README's table), and an unclosed transaction( is said, not dropped."""
    name, env, _ = live_vm
    proc = run_aperture("qmp", name, "--json", env=env, timeout=120, input=script)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert text in proc.stdout + proc.stderr


def test_exec_runs_guest_commands_with_their_status_and_whole_output(live_vm) -> None:
    name, env, _ = live_vm
    proc = run_aperture("exec", name, "--", "echo", "hello", "from", "the", "guest", env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "hello from the guest\n", proc.stderr
    assert run_aperture("exec", name, "--", "exit 7", env=env, timeout=120).returncode == 7
    # far more than one results line can carry: it arrives in chunks, whole and in order
    big = run_aperture("exec", name, "--json", "--", "seq 1 30000; echo 'ünïcode'", env=env, timeout=120)
    result = json.loads(big.stdout)
    assert result["rc"] == 0
    assert result["output"] == "".join(f"{i}\n" for i in range(1, 30001)) + "ünïcode\n"
    # the helper's tools are on the guest's PATH; the device is visible there
    # --guest-bin binaries sit in /usr/local/bin (the busybox shell prefers its own applet of the same name)
    stat = run_aperture("exec", name, "--", "/usr/local/bin/stat --version", env=env, timeout=120)
    assert "GNU coreutils" in stat.stdout
    info = run_aperture("exec", name, "--", "aperture-helper info", env=env, timeout=120)
    assert info.returncode == 0 and info.stdout.strip(), info.stderr
    # and the QMP shell has the same thing as `guest CMD`
    shell = run_aperture("qmp", name, "--json", env=env, timeout=120, input='guest echo "a  b"; false\n')
    reply = json.loads(shell.stdout)["return"]
    assert reply == {"rc": 1, "output": "a  b\n"}
    # a request the daemon refuses keeps its category across the socket: a usage error (2), not "the guest" (4)
    refused = run_aperture("exec", name, "--", "x" * 5000, env=env, timeout=60)
    assert refused.returncode == 2 and "at most 4000 bytes" in refused.stderr, refused.stderr


def test_console(live_vm) -> None:
    name, env, _ = live_vm
    proc = run_aperture("console", name, env=env)
    assert proc.returncode == 0  # a booted guest's console shows /init; a restored one's the restore
    assert "aperture: helper starting" in proc.stdout or "aperture: restored" in proc.stdout


def test_unknown_vm_and_bad_name() -> None:
    env = {"APERTURE_STATE": "/nonexistent-aperture-state"}
    for args in (["qmp", "nope"], ["down", "nope"], ["console", "nope"], ["exec", "nope", "true"]):
        proc = run_aperture(*args, env=env, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = run_aperture("up", "bad/name", env=env, timeout=60)
    assert proc.returncode == 2 and "invalid VM name" in proc.stderr


def test_shell_survives_qemu_going_away(tmp_path: Path) -> None:
    env = {"APERTURE_STATE": str(tmp_path / "state")}
    name = f"g{uuid.uuid4().hex[:6]}"
    assert run_aperture("up", name, "--run-dir", str(tmp_path / "run"), env=env, timeout=240).returncode == 0
    try:
        sh = _spawn(["qmp", name], env)
        sh.expect_exact(f"({name}) ")
        sh.sendline('{"execute": "quit"}')  # plain 'quit' leaves the shell; this stops QEMU under it
        sh.expect_exact(f"({name}) ")
        sh.sendline("query-status")
        sh.expect("error: .*QEMU is gone")
        sh.expect_exact(f"({name}) ")
        sh.sendline("quit")
        sh.expect(pexpect.EOF)
        assert "Traceback" not in (sh.before or "")
    finally:
        run_aperture("down", name, env=env, timeout=120)
    assert not qemu_processes(str(tmp_path / "run"))
    assert run_aperture("ls", "--json", env=env).stdout.strip() == "[]"


def test_down_leaves_nothing_running(tmp_path: Path) -> None:
    env = {"APERTURE_STATE": str(tmp_path / "state")}
    name = f"d{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "run"
    assert run_aperture("up", name, "--run-dir", str(run_dir), env=env, timeout=240).returncode == 0
    proc = run_aperture("down", name, env=env, timeout=120)
    assert proc.returncode == 0 and f"{name} is down" in proc.stdout
    assert not qemu_processes(str(run_dir))
    assert not [p for p in os.listdir("/dev/shm") if name in p]
    assert (run_dir / "devmem0.img").exists()  # device memory stays


def _up_recorded(tmp_path: Path, prefix: str) -> tuple[dict[str, str], str, Path, dict]:
    """`aperture up` a VM with its own state dir; its environment, name, run dir and `ls` record."""
    env = {"APERTURE_STATE": str(tmp_path / "state")}
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "run"
    assert run_aperture("up", name, "--run-dir", str(run_dir), env=env, timeout=240).returncode == 0
    return env, name, run_dir, json.loads(run_aperture("ls", "--json", env=env).stdout)[0]


def test_killed_daemon_leaves_no_qemu(tmp_path: Path) -> None:
    """If the daemon is SIGKILLed, `aperture ls` notices, drops the record and stops the orphaned QEMU."""
    import signal
    import time

    env, name, run_dir, rec = _up_recorded(tmp_path, "k")
    os.kill(rec["pid"], signal.SIGKILL)
    time.sleep(0.5)
    assert json.loads(run_aperture("ls", "--json", env=env).stdout) == []
    for _ in range(50):
        if not qemu_processes(str(run_dir)):
            break
        time.sleep(0.1)
    assert not qemu_processes(str(run_dir))
    assert not [p for p in os.listdir("/dev/shm") if name in p]


@pytest.mark.parametrize("when", ["idle", "mid-DMA"])
def test_killed_daemon_leaves_nothing_within_5_s(tmp_path: Path, when: str) -> None:
    """kill -9 of the daemon: its QEMU dies with it (PDEATHSIG) and its supervisor removes its sockets and record
    at once — nothing is left within 5 s, before any other aperture command runs."""
    import signal
    import time

    env, name, run_dir, rec = _up_recorded(tmp_path, "r")
    record = tmp_path / "state" / "vms" / f"{name}.json"
    assert record.exists()
    if when == "mid-DMA":  # a full ring of maximal DMA lists keeps the device thread copying
        assert run_aperture("exec", name, "--", "aperture-helper flood 0 256 60 > /dev/null 2>&1 &",
                            env=env, timeout=60).returncode == 0
        time.sleep(0.5)
    os.kill(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5

    def left() -> list[str]:
        return (qemu_processes(str(run_dir)) + [p for p in os.listdir("/dev/shm") if name in p]
                + [str(p) for p in (Path(rec["control_socket"]).parent, record) if p.exists()])

    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left(), left()
    assert run_aperture("down", name, env=env, timeout=60).returncode == 2  # simply not up any more


def test_down_reaps_a_vm_whose_daemon_and_supervisor_were_killed(tmp_path: Path) -> None:
    """With nobody left to clean up, `down NAME` (not only `ls`) removes what the VM left."""
    import signal
    import time

    env, name, run_dir, rec = _up_recorded(tmp_path, "s")
    supervisor = int(Path(f"/proc/{rec['pid']}/stat").read_text().rsplit(")", 1)[-1].split()[1])
    os.kill(supervisor, signal.SIGKILL)
    os.kill(rec["pid"], signal.SIGKILL)
    time.sleep(0.5)
    proc = run_aperture("down", name, env=env, timeout=60)
    assert proc.returncode == 0 and "daemon had died" in proc.stdout, proc.stderr
    assert not qemu_processes(str(run_dir))
    assert not [p for p in os.listdir("/dev/shm") if name in p]
    assert not Path(rec["control_socket"]).parent.exists()
    assert json.loads(run_aperture("ls", "--json", env=env).stdout) == []


def test_shell_reads_a_piped_script_and_returns(live_vm) -> None:
    """`printf 'echo hi\\n' | aperture shell NAME` behaves like `ssh host < script`: end of input ends the session,
    with the shell's status."""
    name, env, _ = live_vm
    proc = run_aperture("shell", name, env=env, timeout=60, input="echo hi-from-a-script\nexit 3\n")
    assert "hi-from-a-script" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 3, proc.stderr
    done = run_aperture("shell", name, env=env, timeout=60, input="echo second\n")  # EOF, no exit: status 0
    assert "second" in done.stdout and done.returncode == 0, done.stdout + done.stderr


def test_a_killed_shell_client_leaves_no_session_behind(live_vm) -> None:
    """A client killed with its session open (kill -9, or SIGTERM) does not block the next one: the guest hangs
    the old session up when the client goes away, as sshd does."""
    import signal
    import subprocess
    import time

    name, env, _ = live_vm
    for sig in (signal.SIGKILL, signal.SIGTERM):
        client = subprocess.Popen(aperture_argv() + ["shell", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=dict(os.environ, **env))
        assert client.stdin is not None
        client.stdin.write(b"echo attached; sleep 1000\n")
        client.stdin.flush()
        time.sleep(3)
        client.send_signal(sig)
        client.wait(timeout=30)
        after = run_aperture("shell", name, env=env, timeout=60, input="echo next-client\n")
        assert "next-client" in after.stdout and after.returncode == 0, (sig, after.stdout, after.stderr)
        sleepers = run_aperture("exec", name, "--", "ps | grep -c '[s]leep 1000' || true", env=env, timeout=60)
        assert sleepers.stdout.strip() == "0", f"the killed client's shell job is still running: {sleepers.stdout}"
