"""lambdabox without root: run as an unprivileged user that the test run makes (tests/rootless_support.py), the demo
and a function that probes its sandbox get the same layout, user and limits as with root; where the host cannot give
a part (cgroup v1 cannot be delegated), the degraded notes say exactly that and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rootless_support import REPO, delegated_cgroup_v2, rootless_user, run_as_user
from support import host_cgroups

LAMBDABOX = str(REPO / ".venv" / "bin" / "lambdabox")
DEMO = REPO / "examples" / "demo"
TUN_OPEN = os.stat("/dev/net/tun").st_mode & 0o006 == 0o006 if os.path.exists("/dev/net/tun") else False
PROBE = """
import json, os, subprocess

def handler(event, context):
    found = {"uid": os.getuid(), "gid": os.getgid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
    found.update(cap_eff=status["CapEff"].strip(), no_new_privs=status["NoNewPrivs"].strip())
    for path in ("/etc/probe", "/var/task/probe", "/opt/probe", "/probe"):
        try:
            open(path, "w").close()
            found[path] = "written"
        except OSError as error:
            found[path] = error.errno
    open("/tmp/probe", "w").write("x")
    tmp = os.statvfs("/tmp")
    found["tmp"] = tmp.f_blocks * tmp.f_frsize // 2**20
    found["user"] = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    return found
"""
TEMPLATE = """
Transform: AWS::Serverless-2016-10-31
Resources:
  Probe:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: src/
      Handler: probe.handler
      Runtime: python3.11
      MemorySize: 256
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can read (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lambdabox-rootless-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def invoke_as_user(template: Path, *extra: str, cgroup: Path | None = None) -> tuple[list[object], list[str]]:
    """``lambdabox invoke`` as the unprivileged user; the responses and the degraded notes."""
    result = run_as_user([LAMBDABOX, "invoke", "-t", str(template), *extra], timeout=120, cgroup=cgroup)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("lambdabox: degraded mode: ")]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()], notes


def expected_notes(cgroups: bool) -> set[str]:
    """The first words of each note the host should cause, no more."""
    notes = set() if TUN_OPEN else {"no outbound network (/dev/net/tun cannot be opened"}
    if not cgroups:
        notes |= {"no memory limit (not root, and", "peak memory is sampled", "freezing sends SIGSTOP"}
    return notes


def check_notes(notes: list[str], expected: set[str]) -> None:
    said = {note.removeprefix("lambdabox: degraded mode: ") for note in notes}
    assert all(any(note.startswith(start) for start in expected) for note in said), said
    assert all(any(note.startswith(start) for note in said) for start in expected), said


def probe_function(root: Path) -> Path:
    (root / "src").mkdir()
    (root / "src" / "probe.py").write_text(PROBE)
    (root / "template.yaml").write_text(TEMPLATE)
    for path in (root / "src", root / "src" / "probe.py", root / "template.yaml"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root / "template.yaml"


def check_probe(found: dict[str, object]) -> None:
    assert (found["uid"], found["gid"], found["user"]) == (993, 990, "sbx_user1051")
    assert found["cap_eff"] == "0000000000000000" and found["no_new_privs"] == "1"
    assert all(found[path] == 30 for path in ("/etc/probe", "/var/task/probe", "/opt/probe", "/probe"))  # EROFS
    assert found["tmp"] == 512  # a tmpfs of EphemeralStorage's default size
    pids = found["pids"]
    assert isinstance(pids, list) and pids[0] == 1 and len(pids) < 10  # the environment's own, init first


def test_the_demo_runs_without_root_and_says_only_what_the_host_lacks() -> None:
    if host_cgroups() == "v2":
        pytest.skip("on cgroup v2 the rootless demo runs in a delegated cgroup (the next test)")
    rootless_user()
    responses, notes = invoke_as_user(DEMO / "template.yaml", "-e", str(DEMO / "event.json"), "--repeat", "2")
    assert responses == [{"message": "hello from us-east-1, lambdabox!"}] * 2
    check_notes(notes, expected_notes(cgroups=False))


def test_a_function_without_root_runs_as_lambdas_user_read_only_and_alone(shared_dir: Path) -> None:
    if host_cgroups() == "v2":
        pytest.skip("on cgroup v2 the rootless function runs in a delegated cgroup")
    rootless_user()
    (found,), notes = invoke_as_user(probe_function(shared_dir))
    assert isinstance(found, dict)
    check_probe(found)
    assert not (shared_dir / "src" / "probe").exists() and not Path("/etc/probe").exists()
    check_notes(notes, expected_notes(cgroups=False))


@pytest.mark.cgroup2
def test_without_root_in_a_delegated_cgroup_v2_nothing_is_degraded(shared_dir: Path) -> None:
    if host_cgroups() != "v2":
        pytest.skip("a cgroup is delegated to a user on cgroup v2 only")
    uid, gid, _ = rootless_user()
    with delegated_cgroup_v2(uid, gid) as cgroup:  # (not the demo: its Python extension's Init takes ~7 s in the VM)
        (found,), notes = invoke_as_user(probe_function(shared_dir), cgroup=cgroup)
        assert isinstance(found, dict)
        check_probe(found)
        check_notes(notes, expected_notes(cgroups=True))
