"""Owns the function's seccomp-BPF filter, in the spirit of Firecracker's jailer: the system calls Lambda's sandbox
denies a function (mounts, namespaces, modules, keys, clocks, bpf, ...) fail with EPERM, ``clone3`` with ENOSYS so
libc falls back to ``clone``, whose namespace flags are denied, and a foreign architecture kills the process. Stdlib
only: a ``python -I -S`` helper imports it."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# The numbers the filter names, per machine: x86_64 from arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from
# include/uapi/asm-generic/unistd.h. Every name but clone and clone3 is denied with EPERM.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "swapon": 167,
        "swapoff": 168,
        "reboot": 169,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "setns": 308,
        "unshare": 272,
        "bpf": 321,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "open_by_handle_at": 304,
        "acct": 163,
        "settimeofday": 164,
        "clock_settime": 227,
        "clock_adjtime": 305,
        "adjtimex": 159,
        "quotactl": 179,
        "lookup_dcookie": 212,
        "iopl": 172,
        "ioperm": 173,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "userfaultfd": 323,
        "perf_event_open": 298,
        "clone": 56,
        "clone3": 435,
    },
    "aarch64": {
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "swapon": 224,
        "swapoff": 225,
        "reboot": 142,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "setns": 268,
        "unshare": 97,
        "bpf": 280,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "open_by_handle_at": 265,
        "acct": 89,
        "settimeofday": 170,
        "clock_settime": 112,
        "clock_adjtime": 266,
        "adjtimex": 171,
        "quotactl": 60,
        "lookup_dcookie": 18,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "userfaultfd": 282,
        "perf_event_open": 241,
        "clone": 220,
        "clone3": 435,
    },
}
CLONE_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
BPF_MAXINSNS = 4096
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data
_ARG0_LOW = _ARG0 if sys.byteorder == "little" else _ARG0 + 4
_INSN = struct.Struct("=HBBI")  # struct sock_filter

PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

# An instruction: (code, jt, jf, k), where a jump's jt and jf are labels; a label is (label,).
_Step = tuple[int, str | int, str | int, int] | tuple[str]


def program(machine: str | None = None) -> bytes:
    """The filter for ``machine`` (this one by default) as the raw bytes of an array of ``struct sock_filter``."""
    machine = os.uname().machine if machine is None else machine
    if machine not in SYSCALLS:
        raise ValueError(f"no seccomp filter for machine {machine!r} (only {', '.join(SYSCALLS)})")
    numbers = SYSCALLS[machine]
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    steps: list[_Step] = [
        (BPF_LD_W_ABS, 0, 0, _ARCH),
        (BPF_JEQ_K, "native", "kill", AUDIT_ARCH[machine]),
        ("kill",),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        ("native",),
        (BPF_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        steps += [(BPF_JGE_K, "x32", "not-x32", X32_SYSCALL_BIT), ("x32",), (BPF_RET_K, 0, 0, eperm), ("not-x32",)]
    denied = [(number, eperm) for name, number in numbers.items() if name not in {"clone", "clone3"}]
    for index, (number, result) in enumerate([*denied, (numbers["clone3"], SECCOMP_RET_ERRNO | errno.ENOSYS)]):
        steps += [(BPF_JEQ_K, f"deny-{index}", f"next-{index}", number), (f"deny-{index}",)]
        steps += [(BPF_RET_K, 0, 0, result), (f"next-{index}",)]
    steps += [
        (BPF_JEQ_K, "clone", "allow", numbers["clone"]),
        ("clone",),
        (BPF_LD_W_ABS, 0, 0, _ARG0_LOW),
        (BPF_JSET_K, "namespace", "allow", CLONE_NAMESPACES),
        ("namespace",),
        (BPF_RET_K, 0, 0, eperm),
        ("allow",),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return _assemble(steps)


def _assemble(steps: list[_Step]) -> bytes:
    """Resolve each jump's labels to offsets from the next instruction (each must fit a u8) and pack."""
    labels: dict[str, int] = {}
    instructions: list[tuple[int, str | int, str | int, int]] = []
    for step in steps:
        if len(step) == 1:
            labels[step[0]] = len(instructions)
        else:
            instructions.append(step)
    out = bytearray()
    for position, (code, jt, jf, k) in enumerate(instructions):
        offsets = [labels[target] - position - 1 if isinstance(target, str) else target for target in (jt, jf)]
        if not all(0 <= offset <= 255 for offset in offsets):
            raise ValueError(f"jump out of range at instruction {position}: {offsets}")
        out += _INSN.pack(code, offsets[0], offsets[1], k)
    if len(instructions) > BPF_MAXINSNS:
        raise ValueError(f"{len(instructions)} instructions, more than {BPF_MAXINSNS}")
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(filter_bytes: bytes) -> None:
    """Set no_new_privs, then install ``filter_bytes`` (from :func:`program`) on the calling thread. Call it in a
    freshly forked, single-threaded child just before execve: the filter is inherited across execve and by every
    child, and cannot be removed."""
    if not filter_bytes or len(filter_bytes) % _INSN.size:
        raise ValueError(f"a filter is a whole, non-zero number of {_INSN.size}-byte instructions")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(error)}")
    buffer = ctypes.create_string_buffer(filter_bytes, len(filter_bytes))
    fprog = _SockFprog(len(filter_bytes) // _INSN.size, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_SECCOMP): {os.strerror(error)}")
