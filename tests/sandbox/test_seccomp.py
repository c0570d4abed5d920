"""The seccomp filter: its shape, what it returns for each call on both machines (through a small BPF interpreter), its
numbers against this machine's kernel headers, and, in real filtered processes, what it denies and what still works."""

from __future__ import annotations

import ast
import errno
import json
import platform
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lambdabox.sandbox import seccomp

SRC = Path(seccomp.__file__).parents[2]
MACHINES = ("x86_64", "aarch64")
CLONE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWTIME": 0x00000080,
}
# What glibc's pthread_create passes to clone (plus SIGCHLD for a fork-like clone): no namespace flag.
THREAD_FLAGS = 0x003D0F00
FORK_FLAGS = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
ALLOW = seccomp.SECCOMP_RET_ALLOW
KILL = seccomp.SECCOMP_RET_KILL_PROCESS
DENIED = {
    "mount", "umount2", "pivot_root", "chroot", "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "setns", "unshare", "bpf", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "quotactl",
    "lookup_dcookie", "fsopen", "fsmount", "fsconfig", "fspick", "move_mount", "open_tree", "mount_setattr",
    "userfaultfd", "perf_event_open",
}  # fmt: skip
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}
ALLOWED = {"x86_64": {"read": 0, "write": 1, "getpid": 39, "execve": 59}, "aarch64": {"read": 63, "getpid": 172}}


def instructions(filter_bytes: bytes) -> list[tuple[int, int, int, int]]:
    return list(struct.iter_unpack("=HBBI", filter_bytes))


def run_filter(filter_bytes: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """What the kernel would return for this call: a small interpreter of the instructions the filter uses."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    program, pc, accumulator = instructions(filter_bytes), 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            (accumulator,) = struct.unpack_from("=I", data, k)
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            taken = {
                seccomp.BPF_JEQ_K: accumulator == k,
                seccomp.BPF_JGE_K: accumulator >= k,
                seccomp.BPF_JSET_K: bool(accumulator & k),
            }[code]
            pc += jt if taken else jf


@pytest.mark.parametrize("machine", MACHINES)
def test_the_program_is_well_formed(machine: str) -> None:
    filter_bytes = seccomp.program(machine)
    assert filter_bytes and len(filter_bytes) % 8 == 0
    program = instructions(filter_bytes)
    assert len(program) < 4096
    for position, (code, jt, jf, _) in enumerate(program):
        if code in {seccomp.BPF_JEQ_K, seccomp.BPF_JGE_K, seccomp.BPF_JSET_K}:
            assert position + 1 + max(jt, jf) < len(program), f"jump at {position} lands outside"
        else:
            assert (jt, jf) == (0, 0)
    assert program[-1][0] == seccomp.BPF_RET_K


def test_this_machine_is_the_default() -> None:
    assert seccomp.program() == seccomp.program(platform.machine())


@pytest.mark.parametrize("machine", ["i686", "armv7l", "riscv64", ""])
def test_an_unknown_machine_is_refused(machine: str) -> None:
    with pytest.raises(ValueError, match="machine"):
        seccomp.program(machine)


@pytest.mark.parametrize("machine", MACHINES)
def test_what_the_filter_returns(machine: str) -> None:
    filter_bytes, arch, numbers = seccomp.program(machine), seccomp.AUDIT_ARCH[machine], seccomp.SYSCALLS[machine]
    expected_denied = DENIED | ({"iopl", "ioperm"} if machine == "x86_64" else set())
    assert set(numbers) == expected_denied | {"clone", "clone3"}
    for name in expected_denied:
        assert run_filter(filter_bytes, numbers[name], arch) == EPERM, name
    assert run_filter(filter_bytes, numbers["clone3"], arch) == ENOSYS
    for name, flag in CLONE_FLAGS.items():
        assert run_filter(filter_bytes, numbers["clone"], arch, (flag | FORK_FLAGS, 0, 0, 0, 0, 0)) == EPERM, name
    for flags in (THREAD_FLAGS, FORK_FLAGS, 1 << 32 | FORK_FLAGS):
        assert run_filter(filter_bytes, numbers["clone"], arch, (flags, 0, 0, 0, 0, 0)) == ALLOW
    for name, number in ALLOWED[machine].items():
        assert run_filter(filter_bytes, number, arch, (1,) * 6) == ALLOW, name
    other = seccomp.AUDIT_ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    assert run_filter(filter_bytes, ALLOWED[machine]["getpid"], other) == KILL
    assert run_filter(filter_bytes, ALLOWED[machine]["getpid"], 0x40000003) == KILL  # i386
    x32 = run_filter(filter_bytes, 0x40000000 | 39, arch)
    assert x32 == (EPERM if machine == "x86_64" else ALLOW)


@pytest.mark.parametrize("machine", MACHINES)
def test_the_numbers_match_the_kernel_headers(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"no {header}")
    defined = {m[1]: int(m[2]) for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", header.read_text(), re.M)}
    assert "mount" in defined
    for name, number in seccomp.SYSCALLS[machine].items():
        if name in defined:
            assert defined[name] == number, name


def test_the_module_imports_only_the_stdlib() -> None:
    tree = ast.parse(Path(seccomp.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names and all(name.split(".")[0] in sys.stdlib_module_names for name in names), names


def test_a_bad_filter_is_refused_before_any_prctl() -> None:
    for bad in (b"", b"\0" * 7):
        with pytest.raises(ValueError, match="instructions"):
            seccomp.install(bad)


# Run with -I -S (as the helper is): the module, and this script, must need nothing outside the stdlib.
CHILD = r"""
import ctypes, errno, json, os, platform, socket, subprocess, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
from lambdabox.sandbox import seccomp

if sys.argv[2] == "filter":
    seccomp.install(seccomp.program())
libc = ctypes.CDLL(None, use_errno=True)
CLONE = {"x86_64": 56, "aarch64": 220}[platform.machine()]
CLONE_SIGHAND = 0x800  # without CLONE_VM: EINVAL from the kernel, so a clone the filter lets through makes no process


def error(result):
    return 0 if result != -1 else ctypes.get_errno()


def syscall(*args):
    return error(libc.syscall(*(ctypes.c_long(arg) for arg in args)))


def status(text):
    fields = (line.partition(":") for line in text.splitlines())
    return {k: v.strip() for k, _, v in fields if k in ("Seccomp", "NoNewPrivs")}


out = {
    "clone3": syscall(435, 0, 0),
    "clone": {name: syscall(CLONE, flag | CLONE_SIGHAND, 0, 0, 0, 0) for name, flag in json.loads(sys.argv[3]).items()},
    "clone_plain": syscall(CLONE, CLONE_SIGHAND, 0, 0, 0, 0),
}
if sys.argv[2] == "filter":
    with open("/proc/self/status") as f:
        out["self"] = status(f.read())
    out["mount"] = error(libc.mount(b"none", b"/", b"lambdabox-no-such-fs", 0, None))
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
    out["setns"] = error(libc.setns(fd, 0x04000000))
    os.close(fd)
    if platform.machine() == "x86_64":
        out["x32"] = syscall(0x40000000 | 39)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    thread.start()
    thread.join()
    out["thread"] = len(seen) == 1 and seen[0] != threading.get_native_id()
    out["true"] = subprocess.run(["/bin/true"]).returncode
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        out["socket"] = sock.getsockname()[1] > 0
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "file")
        with open(path, "w") as f:
            f.write("written")
        with open(path) as f:
            out["file"] = f.read()
    out["pid"] = os.getpid()
    child = subprocess.run(["/bin/sh", "-c", "cat /proc/self/status"], capture_output=True, text=True)
    out["child"] = status(child.stdout)
    unshare = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True)
    out["unshare_cmd"] = [unshare.returncode, unshare.stderr]
    out["unshare"] = error(libc.unshare(0x10000000))  # last: unfiltered, it would leave this process in a new user ns
print(json.dumps(out))
"""


def run_child(mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, str(SRC), mode, json.dumps(CLONE_FLAGS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def filtered() -> dict[str, Any]:
    return run_child("filter")


def test_without_the_filter_the_clone_probes_reach_the_kernel() -> None:
    out = run_child("none")
    assert out["clone3"] == errno.EINVAL
    assert out["clone"] == dict.fromkeys(CLONE_FLAGS, errno.EINVAL)
    assert out["clone_plain"] == errno.EINVAL


def test_install_sets_no_new_privs_and_a_filter(filtered: dict[str, Any]) -> None:
    assert filtered["self"] == {"NoNewPrivs": "1", "Seccomp": "2"}


def test_the_filter_denies_namespaces_mounts_and_clone3(filtered: dict[str, Any]) -> None:
    assert filtered["unshare"] == errno.EPERM
    assert filtered["mount"] == errno.EPERM
    assert filtered["setns"] == errno.EPERM
    assert filtered["clone3"] == errno.ENOSYS
    assert filtered["clone"] == dict.fromkeys(CLONE_FLAGS, errno.EPERM)
    assert filtered["clone_plain"] == errno.EINVAL  # let through to the kernel
    if platform.machine() == "x86_64":
        assert filtered["x32"] == errno.EPERM


def test_ordinary_work_goes_on_under_the_filter(filtered: dict[str, Any]) -> None:
    assert filtered["thread"] is True
    assert filtered["true"] == 0
    assert filtered["socket"] is True
    assert filtered["file"] == "written"
    assert isinstance(filtered["pid"], int) and filtered["pid"] > 1


def test_children_inherit_the_filter(filtered: dict[str, Any]) -> None:
    assert filtered["child"] == {"NoNewPrivs": "1", "Seccomp": "2"}
    returncode, stderr = filtered["unshare_cmd"]
    assert returncode != 0
    assert "Operation not permitted" in stderr


def test_a_filter_the_kernel_rejects_raises_oserror_naming_the_call() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from lambdabox.sandbox import seccomp\n"
        "try:\n    seccomp.install(bytes(8))\nexcept OSError as e:\n    print(e.errno, e.strerror)\n"
    )  # bytes(8) is BPF_LD|BPF_W|BPF_IMM with no return: the kernel refuses it
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(SRC)], capture_output=True, text=True, timeout=60, check=True
    )
    number, _, message = done.stdout.strip().partition(" ")
    assert int(number) == errno.EINVAL
    assert message.startswith("prctl(PR_SET_SECCOMP)")
