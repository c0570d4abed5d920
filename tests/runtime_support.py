"""Test support for the runtime tests: the local Pythons to test with, and resolve_runtime with Lambda's roots."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.errors import ConfigError
from lambdabox.sandbox.python_runtime import find_python
from lambdabox.sandbox.runtime import RuntimeCommand, resolve_runtime

RUNNING = f"python3.{sys.version_info.minor}"
BASE_PYTHON: str = getattr(sys, "_base_executable", sys.executable)  # this Python outside any venv
AWSLAMBDARIC = importlib.metadata.version("awslambdaric")


def _other_python() -> str | None:
    """Another local python3.X than the one running the tests (an older one first: it takes the
    older-awslambdaric path), or None."""
    for minor in (9, 10, 12, 13):
        if minor == sys.version_info.minor:
            continue
        try:
            find_python(minor)
        except ConfigError:
            continue
        return f"python3.{minor}"
    return None


OTHER = _other_python()
PYTHONS = [RUNNING, pytest.param(OTHER, marks=pytest.mark.skipif(OTHER is None, reason="no second python3.X"))]


def resolve(runtime: str, cache_dir: Path, **kw: Any) -> RuntimeCommand:
    args: dict[str, Any] = {"task_root": "/var/task", "opt_root": "/opt", "wrapper": None} | kw
    return resolve_runtime(runtime, cache_dir=cache_dir, **args)


def run_in(cmd: RuntimeCommand, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the runtime's interpreter and the runtime's variables (and nothing of ours)."""
    full_env = {"PATH": "/usr/bin:/bin", **cmd.env, **env}
    return subprocess.run(
        [cmd.argv[0], "-c", code], env=full_env, capture_output=True, text=True, timeout=60, check=False
    )
