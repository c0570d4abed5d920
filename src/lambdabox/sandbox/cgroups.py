"""Owns an environment's cgroups (v1), made under CGROUP_ROOT: the memory cgroup (the memory limit, peak memory,
OOM kills) and the freezer cgroup, and the files kept open to read and write them."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class Cgroups:
    """One environment's memory and freezer cgroups; ``memory`` and ``freezer`` are None without them."""

    def __init__(self) -> None:
        self.memory: Path | None = None
        self.freezer: Path | None = None
        self._peak_fd: int | None = None
        self._freezer_fd: int | None = None

    def paths(self) -> tuple[Path, ...]:
        # Freezer first: then whatever the memory cgroup counts can also be frozen.
        return (self.freezer, self.memory) if self.memory and self.freezer else ()

    def make(self, name: str, memory_mb: int) -> str | None:
        """Create the memory and freezer cgroups; None, or why they cannot be had."""
        if os.geteuid() != 0:
            return "not root"
        for controller, probe in (("memory", "memory.limit_in_bytes"), ("freezer", "cgroup.procs")):
            if not (CGROUP_ROOT / controller / probe).exists():
                return f"no cgroup v1 {controller} controller at {CGROUP_ROOT / controller}"
        leaf = f"lambdabox-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}-{secrets.token_hex(4)}"
        limit = memory_mb * 1024 * 1024
        try:
            (memory := CGROUP_ROOT / "memory" / leaf).mkdir()
            self.memory = memory
            (memory / "memory.limit_in_bytes").write_text(str(limit))
            if int((memory / "memory.limit_in_bytes").read_text()) != limit:
                raise OSError(f"memory.limit_in_bytes did not take {limit}")
            with contextlib.suppress(OSError):  # no such file when swap accounting is off
                (memory / "memory.memsw.limit_in_bytes").write_text(str(limit))
            (freezer := CGROUP_ROOT / "freezer" / leaf).mkdir()
            self.freezer = freezer
            if not (freezer / "freezer.state").exists():
                raise OSError(f"{freezer} has no freezer.state")
        except OSError as e:
            for cg in (c for c in (self.memory, self.freezer) if c is not None):
                with contextlib.suppress(OSError):
                    cg.rmdir()
            self.memory = self.freezer = None
            return f"cannot set up cgroups: {e}"
        return None

    def peak_memory_bytes(self) -> int | None:
        """Peak memory the memory cgroup counted since it was made; None without one."""
        if self.memory is None:
            return None
        if self._peak_fd is None:  # read once per invoke: an open descriptor and pread keep it cheap
            self._peak_fd = os.open(self.memory / "memory.max_usage_in_bytes", os.O_RDONLY)
        return int(os.pread(self._peak_fd, 32, 0))

    def oom_kill_count(self) -> int:
        """OOM kills in the cgroup (or, on kernels without that counter, times the limit was hit)."""
        if self.memory is None:
            return 0
        for line in (self.memory / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return int((self.memory / "memory.failcnt").read_text())

    def write_freezer(self, state: str) -> None:
        assert self.freezer is not None
        if self._freezer_fd is None:  # written twice per invoke: kept open
            self._freezer_fd = os.open(self.freezer / "freezer.state", os.O_WRONLY)
        os.write(self._freezer_fd, state.encode())

    def close_files(self) -> None:
        for fd in (self._peak_fd, self._freezer_fd):
            if fd is not None:
                os.close(fd)
        self._peak_fd = self._freezer_fd = None
