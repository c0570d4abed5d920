"""The Python runtimes' installs: interpreters found and their venvs, awslambdaric and boto3 installed once per
runtime, reinstalled when the requirement changes, and every failure named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.errors import ConfigError, SandboxError
from lambdabox.sandbox import python_runtime
from lambdabox.sandbox.python_runtime import find_python
from lambdabox.sandbox.runtime import RuntimeCommand, runtime_dir_for
from runtime_support import AWSLAMBDARIC, BASE_PYTHON, PYTHONS, RUNNING, resolve, run_in


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_interpreter_version_and_not_our_venv(runtime: str, runtime_cache: Path) -> None:
    cmd = resolve(runtime, runtime_cache)
    out = run_in(cmd, "import sys; print(sys.version_info[0], sys.version_info[1], sys.prefix)")
    assert out.returncode == 0, out.stderr
    major, minor, prefix = out.stdout.split()
    assert f"python{major}.{minor}" == runtime
    assert Path(prefix) != Path(sys.prefix)  # not lambdabox's venv
    # python3 on the runtime's PATH prefix is the same interpreter (what wrapper scripts run).
    assert os.path.realpath(Path(cmd.path_prefix[0], "python3")) == os.path.realpath(cmd.argv[0])


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_runtime_dir_contents(runtime: str, runtime_cache: Path) -> None:
    resolve(runtime, runtime_cache)
    runtime_dir = runtime_dir_for(runtime, runtime_cache)
    for name in ("awslambdaric", "boto3", "botocore", "s3transfer", "simplejson"):
        assert (runtime_dir / name).is_dir(), name
    assert not (runtime_dir / "bin").exists()
    marker = json.loads((runtime_dir / ".lambdabox-runtime.json").read_text())
    assert marker["requirements"][1:] == ["boto3"]
    dist = [p.name for p in runtime_dir.glob("awslambdaric-*.dist-info")]
    assert len(dist) == 1
    if marker["requirements"][0] == f"awslambdaric=={AWSLAMBDARIC}":
        assert dist == [f"awslambdaric-{AWSLAMBDARIC}.dist-info"]
    else:  # an interpreter older than this awslambdaric supports gets the newest one that runs on it
        assert marker["requirements"][0] == f"awslambdaric<{AWSLAMBDARIC}"
    # Nothing left over from the install.
    assert sorted(p.name for p in runtime_dir.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_second_resolve_installs_nothing(runtime_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve(RUNNING, runtime_cache)

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected subprocess {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert resolve(RUNNING, runtime_cache) == first


def test_concurrent_first_uses_install_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    started = threading.Event()

    def fake_pip(runtime: str, base: Path, runtime_dir: Path, requirements: list[str]) -> None:
        calls.append(requirements)
        started.set()
        runtime_dir.mkdir(parents=True)
        (runtime_dir / ".lambdabox-runtime.json").write_text(json.dumps({"requirements": requirements}))

    monkeypatch.setattr(python_runtime, "_pip_install", fake_pip)
    barrier = threading.Barrier(3)
    results: list[RuntimeCommand] = []
    errors: list[BaseException] = []

    def use() -> None:
        barrier.wait()
        try:
            results.append(resolve(RUNNING, tmp_path))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(calls) == 1
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert Path(results[0].argv[0]).exists()


def test_reinstalls_when_awslambdaric_version_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_pip(runtime: str, base: Path, runtime_dir: Path, requirements: list[str]) -> None:
        calls.append(requirements)
        runtime_dir.mkdir(parents=True, exist_ok=True)
        (runtime_dir / ".lambdabox-runtime.json").write_text(json.dumps({"requirements": requirements}))

    monkeypatch.setattr(python_runtime, "_pip_install", fake_pip)
    resolve(RUNNING, tmp_path)
    resolve(RUNNING, tmp_path)
    monkeypatch.setattr(python_runtime, "_requirements", lambda minor: ["awslambdaric==0.0.1", "boto3"])
    resolve(RUNNING, tmp_path)
    assert [c[0] for c in calls] == [f"awslambdaric=={AWSLAMBDARIC}", "awslambdaric==0.0.1"]


def test_pip_failure_names_the_runtime_and_shows_pips_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_package-1.0-py3-none-any.whl"  # a local path: pip fails without the network
    monkeypatch.setattr(python_runtime, "_requirements", lambda minor: [str(missing)])
    with pytest.raises(SandboxError) as info:
        resolve(RUNNING, tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"runtime {RUNNING}: installing ")
    assert "no_such_package-1.0-py3-none-any.whl" in message.split("failed", 1)[1]  # from pip's output
    runtime_dir = runtime_dir_for(RUNNING, tmp_path / "cache")
    assert not runtime_dir.exists()
    assert [p.name for p in runtime_dir.parent.iterdir()] == [f"{RUNNING}.lock"]


def test_missing_interpreter() -> None:
    with pytest.raises(ConfigError) as info:
        find_python(99)
    assert str(info.value) == "runtime python3.99 needs a local python3.99 interpreter on PATH"


def test_missing_interpreter_through_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minor = 9 if sys.version_info.minor != 9 else 10  # a supported runtime that is not the running Python
    monkeypatch.setenv("PATH", "")  # nowhere to find its interpreter
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))
    monkeypatch.setenv("UV_PYTHON_INSTALL_DIR", str(tmp_path / "no-uv"))
    with pytest.raises(ConfigError, match=rf"^runtime python3\.{minor} needs a local python3\.{minor} interpreter"):
        resolve(f"python3.{minor}", tmp_path)
    assert not (tmp_path / "lang").exists()


def test_find_python_returns_the_base_interpreter_for_the_running_version() -> None:
    found = find_python(sys.version_info.minor)
    assert found == Path(BASE_PYTHON)
    assert not found.is_relative_to(sys.prefix) or sys.prefix == sys.base_prefix


def test_requires_python_check() -> None:
    assert python_runtime._python_satisfies((3, 12), ">=3.10")
    assert not python_runtime._python_satisfies((3, 9), ">=3.10")
    assert python_runtime._python_satisfies((3, 9), ">=3.9, <4")
    assert not python_runtime._python_satisfies((3, 13), ">=3.8,<3.13")
    assert python_runtime._python_satisfies((3, 9), "")
    assert python_runtime._python_satisfies((3, 9), "~=3.8")  # clauses it does not know pass


def test_awslambdaric_requirement() -> None:
    assert python_runtime._awslambdaric_requirement(sys.version_info.minor) == f"awslambdaric=={AWSLAMBDARIC}"
    # awslambdaric 4.1+ needs Python 3.10; older interpreters get the newest release below ours.
    assert python_runtime._awslambdaric_requirement(2) == f"awslambdaric<{AWSLAMBDARIC}"
