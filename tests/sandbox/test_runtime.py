"""How runtimes are started: interpreters, runtime-client installs, import isolation, wrappers, bootstraps."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.errors import ConfigError, SandboxError
from lambdabox.sandbox import runtime as rt
from lambdabox.sandbox.runtime import (
    PYTHON_BOOTSTRAP,
    RuntimeCommand,
    find_node_ric,
    find_python,
    resolve_runtime,
    runtime_dir_for,
)

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


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runtime cache for the session: the first use of each Python version installs from PyPI."""
    return tmp_path_factory.mktemp("runtime-cache")


def resolve(runtime: str, cache_dir: Path, **kw: Any) -> RuntimeCommand:
    args: dict[str, Any] = {"task_root": "/var/task", "opt_root": "/opt", "wrapper": None} | kw
    return resolve_runtime(runtime, cache_dir=cache_dir, **args)


def run_in(cmd: RuntimeCommand, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the runtime's interpreter and the runtime's variables (and nothing of ours)."""
    full_env = {"PATH": "/usr/bin:/bin", **cmd.env, **env}
    return subprocess.run(
        [cmd.argv[0], "-c", code], env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


# --------------------------------------------------------------------------------------------------- python


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_python_command(runtime: str, cache: Path) -> None:
    cmd = resolve(runtime, cache)
    assert cmd.argv[-1] == str(PYTHON_BOOTSTRAP)
    assert cmd.argv[-1].endswith("python_bootstrap.py") and PYTHON_BOOTSTRAP.is_file()
    assert len(cmd.argv) == 2
    assert Path(cmd.argv[0]).name == runtime
    assert cmd.telemetry_fd is True
    assert dict(cmd.env) == {
        "PYTHONPATH": f"/var/task:/opt/python:/opt/python/lib/{runtime}/site-packages:{cache}/runtime/{runtime}",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}",
    }
    assert cmd.path_prefix == (str(Path(cmd.argv[0]).parent),)
    assert runtime_dir_for(runtime, cache) == cache / "runtime" / runtime


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_interpreter_version_and_not_our_venv(runtime: str, cache: Path) -> None:
    cmd = resolve(runtime, cache)
    out = run_in(cmd, "import sys; print(sys.version_info[0], sys.version_info[1], sys.prefix)")
    assert out.returncode == 0, out.stderr
    major, minor, prefix = out.stdout.split()
    assert f"python{major}.{minor}" == runtime
    assert Path(prefix) != Path(sys.prefix)  # not lambdabox's venv
    # python3 on the runtime's PATH prefix is the same interpreter (what wrapper scripts run).
    assert os.path.realpath(Path(cmd.path_prefix[0], "python3")) == os.path.realpath(cmd.argv[0])


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_runtime_dir_contents(runtime: str, cache: Path) -> None:
    resolve(runtime, cache)
    runtime_dir = runtime_dir_for(runtime, cache)
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
@pytest.mark.parametrize("runtime", PYTHONS)
def test_function_sees_runtime_packages_and_nothing_of_lambdabox(runtime: str, cache: Path) -> None:
    cmd = resolve(runtime, cache)
    code = """
import importlib, json
found = {}
for name in ("awslambdaric", "boto3", "botocore", "aiohttp", "click", "yaml", "lambdabox", "requests"):
    try:
        found[name] = importlib.import_module(name).__file__
    except ImportError:
        found[name] = None
print(json.dumps(found))
"""
    out = run_in(cmd, code)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    runtime_dir = str(runtime_dir_for(runtime, cache))
    for name in ("awslambdaric", "boto3", "botocore"):
        assert found[name] is not None and found[name].startswith(runtime_dir + "/"), found[name]
    # lambdabox's own dependencies, lambdabox itself, and the base interpreter's extra packages stay out.
    for name in ("aiohttp", "click", "yaml", "lambdabox", "requests"):
        assert found[name] is None, (name, found[name])


@pytest.mark.slow
def test_function_code_and_layers_come_before_the_runtime_packages(cache: Path, tmp_path: Path) -> None:
    task, opt = tmp_path / "task", tmp_path / "opt"
    (task).mkdir()
    (opt / "python").mkdir(parents=True)
    (task / "boto3.py").write_text("WHO = 'task'\n")
    (opt / "python" / "botocore.py").write_text("WHO = 'layer'\n")
    cmd = resolve(RUNNING, cache, task_root=str(task), opt_root=str(opt))
    out = run_in(cmd, "import boto3, botocore; print(boto3.WHO, botocore.WHO)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["task", "layer"]


@pytest.mark.slow
def test_second_resolve_installs_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve(RUNNING, cache)

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected subprocess {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert resolve(RUNNING, cache) == first


def test_concurrent_first_uses_install_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    started = threading.Event()

    def fake_pip(runtime: str, base: Path, runtime_dir: Path, requirements: list[str]) -> None:
        calls.append(requirements)
        started.set()
        runtime_dir.mkdir(parents=True)
        (runtime_dir / ".lambdabox-runtime.json").write_text(json.dumps({"requirements": requirements}))

    monkeypatch.setattr(rt, "_pip_install", fake_pip)
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

    monkeypatch.setattr(rt, "_pip_install", fake_pip)
    resolve(RUNNING, tmp_path)
    resolve(RUNNING, tmp_path)
    monkeypatch.setattr(rt, "_requirements", lambda minor: ["awslambdaric==0.0.1", "boto3"])
    resolve(RUNNING, tmp_path)
    assert [c[0] for c in calls] == [f"awslambdaric=={AWSLAMBDARIC}", "awslambdaric==0.0.1"]


def test_pip_failure_names_the_runtime_and_shows_pips_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_package-1.0-py3-none-any.whl"  # a local path: pip fails without the network
    monkeypatch.setattr(rt, "_requirements", lambda minor: [str(missing)])
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


def test_missing_interpreter_through_resolve(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^runtime python3\.99 needs a local python3\.99 interpreter on PATH$"):
        resolve("python3.99", tmp_path)
    assert not (tmp_path / "lang").exists()


def test_find_python_returns_the_base_interpreter_for_the_running_version() -> None:
    found = find_python(sys.version_info.minor)
    assert found == Path(BASE_PYTHON)
    assert not found.is_relative_to(sys.prefix) or sys.prefix == sys.base_prefix


def test_requires_python_check() -> None:
    assert rt._python_satisfies((3, 12), ">=3.10")
    assert not rt._python_satisfies((3, 9), ">=3.10")
    assert rt._python_satisfies((3, 9), ">=3.9, <4")
    assert not rt._python_satisfies((3, 13), ">=3.8,<3.13")
    assert rt._python_satisfies((3, 9), "")
    assert rt._python_satisfies((3, 9), "~=3.8")  # clauses it does not know pass


def test_awslambdaric_requirement() -> None:
    assert rt._awslambdaric_requirement(sys.version_info.minor) == f"awslambdaric=={AWSLAMBDARIC}"
    # awslambdaric 4.1+ needs Python 3.10; older interpreters get the newest release below ours.
    assert rt._awslambdaric_requirement(2) == f"awslambdaric<{AWSLAMBDARIC}"


# -------------------------------------------------------------------------------------- python bootstrap


def fake_awslambdaric(root: Path) -> Path:
    """A stand-in awslambdaric whose entry point reports what it was started with."""
    pkg = root / "awslambdaric"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import json, os, sys\n"
        "def main(args):\n"
        "    print(json.dumps({'args': args, 'cwd': os.getcwd(), 'path': sys.path,\n"
        "                      'dev_mode': sys.flags.dev_mode, 'api': os.environ.get('AWS_LAMBDA_RUNTIME_API')}))\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('imported as a module, never run as __main__')\n"
    )
    return root


def run_bootstrap(argv: list[str], tmp_path: Path, **env: str) -> dict[str, Any]:
    task = tmp_path / "task"
    task.mkdir(exist_ok=True)
    ric = fake_awslambdaric(tmp_path / "runtime")
    full_env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{task}:{ric}",
        "LAMBDA_TASK_ROOT": str(task),
        "LAMBDA_RUNTIME_DIR": str(ric),
        "AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001",
        "_HANDLER": "app.handler",
        **env,
    }
    out = subprocess.run(argv, env=full_env, cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_bootstrap_runs_awslambdaric_main_with_handler_from_env(tmp_path: Path) -> None:
    seen = run_bootstrap([BASE_PYTHON, str(PYTHON_BOOTSTRAP)], tmp_path)
    task = str(tmp_path / "task")
    assert seen["args"] == [str(PYTHON_BOOTSTRAP), "app.handler"]
    assert seen["cwd"] == task  # the app root awslambdaric 3.x takes from the working directory
    assert seen["path"][0] == task
    assert seen["api"] == "127.0.0.1:9001"
    # lambdabox's sandbox package directory (the script's own) is not importable by the function.
    assert str(PYTHON_BOOTSTRAP.parent) not in seen["path"]


def test_bootstrap_keeps_runtime_dir_importable_when_pythonpath_is_overridden(tmp_path: Path) -> None:
    seen = run_bootstrap([BASE_PYTHON, str(PYTHON_BOOTSTRAP)], tmp_path, PYTHONPATH="/nowhere")
    assert seen["path"][0] == str(tmp_path / "task")
    assert seen["path"][-1] == str(tmp_path / "runtime")


def test_sample_wrapper_inserting_flags_and_rewriting_handler(tmp_path: Path) -> None:
    # Like AWS's sample wrappers (flags before the last argument) and OpenTelemetry's (rewrites _HANDLER).
    wrapper = tmp_path / "opt" / "wrapper"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/bash\n"
        'args=("$@")\n'
        'export ORIG_HANDLER="$_HANDLER" _HANDLER="otel.wrapped_handler"\n'
        'exec "${args[@]:0:$#-1}" -X dev "${args[@]: -1}"\n'
    )
    wrapper.chmod(0o755)
    cmd = RuntimeCommand(argv=(str(wrapper), BASE_PYTHON, str(PYTHON_BOOTSTRAP)), env={}, telemetry_fd=True)
    seen = run_bootstrap(list(cmd.argv), tmp_path)
    assert seen["args"][1] == "otel.wrapped_handler"
    assert seen["dev_mode"] is True


# ------------------------------------------------------------------------------------------------ wrappers


@pytest.mark.slow
def test_wrapper_prefixes_the_command(cache: Path) -> None:
    plain = resolve(RUNNING, cache)
    wrapped = resolve(RUNNING, cache, wrapper="/opt/otel-instrument")
    assert wrapped.argv == ("/opt/otel-instrument", *plain.argv)
    assert wrapped.env == plain.env and wrapped.telemetry_fd == plain.telemetry_fd


@pytest.mark.slow
def test_wrapper_path_follows_the_roots_without_a_mount_namespace(cache: Path, tmp_path: Path) -> None:
    roots = {"task_root": str(tmp_path / "task"), "opt_root": str(tmp_path / "opt")}
    assert resolve(RUNNING, cache, wrapper="/opt/otel-instrument", **roots).argv[0] == f"{tmp_path}/opt/otel-instrument"
    assert resolve(RUNNING, cache, wrapper="/var/task/wrap.sh", **roots).argv[0] == f"{tmp_path}/task/wrap.sh"
    assert resolve(RUNNING, cache, wrapper="/usr/local/bin/w", **roots).argv[0] == "/usr/local/bin/w"
    assert resolve(RUNNING, cache, wrapper="/optional/w", **roots).argv[0] == "/optional/w"


# ---------------------------------------------------------------------------------------------- provided.*


def make_bootstrap(directory: Path, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bootstrap"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("runtime", ["provided", "provided.al2", "provided.al2023"])
def test_provided_prefers_the_function_code_bootstrap(runtime: str, tmp_path: Path) -> None:
    task = make_bootstrap(tmp_path / "task")
    make_bootstrap(tmp_path / "opt")
    cmd = resolve(runtime, tmp_path / "cache", task_root=str(tmp_path / "task"), opt_root=str(tmp_path / "opt"))
    assert cmd == RuntimeCommand(argv=(str(task),), env={}, telemetry_fd=False)


def test_provided_falls_back_to_the_layer_bootstrap(tmp_path: Path) -> None:
    (tmp_path / "task").mkdir()
    opt = make_bootstrap(tmp_path / "opt")
    cmd = resolve(
        "provided.al2023", tmp_path / "cache", task_root=str(tmp_path / "task"), opt_root=str(tmp_path / "opt")
    )
    assert cmd.argv == (str(opt),)
    assert "AWS_EXECUTION_ENV" not in cmd.env


def test_provided_ignores_the_exec_wrapper(tmp_path: Path) -> None:
    task = make_bootstrap(tmp_path / "task")
    cmd = resolve(
        "provided.al2", tmp_path / "cache", task_root=str(tmp_path / "task"), opt_root="/opt", wrapper="/opt/w"
    )
    assert cmd.argv == (str(task),)


def test_provided_without_bootstrap(tmp_path: Path) -> None:
    (tmp_path / "task").mkdir()
    with pytest.raises(ConfigError) as info:
        resolve("provided.al2023", tmp_path / "cache", task_root=str(tmp_path / "task"), opt_root=str(tmp_path / "opt"))
    assert str(info.value) == (
        "runtime provided.al2023 needs an executable bootstrap in the function code or a layer: "
        f"neither {tmp_path}/task/bootstrap nor {tmp_path}/opt/bootstrap exists"
    )


def test_provided_bootstrap_not_executable(tmp_path: Path) -> None:
    task = make_bootstrap(tmp_path / "task", mode=0o644)
    make_bootstrap(tmp_path / "opt")  # an executable one in a layer does not stand in for it
    with pytest.raises(ConfigError, match=f"^runtime provided: {task} exists but is not an executable file$"):
        resolve("provided", tmp_path / "cache", task_root=str(tmp_path / "task"), opt_root=str(tmp_path / "opt"))
    task.unlink()
    task.mkdir()
    with pytest.raises(ConfigError, match="is not an executable file"):
        resolve("provided", tmp_path / "cache", task_root=str(tmp_path / "task"), opt_root=str(tmp_path / "opt"))


@pytest.mark.parametrize("runtime", ["java21", "ruby3.3", "dotnet8", "python2.7", "nodejs", "go1.x", ""])
def test_unsupported_runtimes(runtime: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not supported by lambdabox"):
        resolve(runtime, tmp_path)
    with pytest.raises(ConfigError, match="is not supported by lambdabox"):
        runtime_dir_for(runtime, tmp_path)


# --------------------------------------------------------------------------------------------------- node


def _node_ric() -> Path | None:
    try:
        return find_node_ric()
    except ConfigError:
        return None


NODE_RIC = _node_ric()
needs_node_ric = pytest.mark.skipif(
    NODE_RIC is None or shutil.which("node") is None,
    reason="aws-lambda-ric is not installed (run scripts/install-node-ric.sh) or node is not on PATH",
)


@pytest.mark.node
@needs_node_ric
def test_node_command(tmp_path: Path) -> None:
    cmd = resolve("nodejs20.x", tmp_path, opt_root="/opt")
    node = shutil.which("node")
    assert node is not None
    assert cmd.argv[0] == node
    assert cmd.argv[-1].endswith(".mjs")
    assert cmd.telemetry_fd is True
    assert dict(cmd.env) == {
        "NODE_PATH": "/opt/nodejs/node20/node_modules:/opt/nodejs/node_modules:"
        f"{tmp_path}/runtime/nodejs20.x/node_modules",
        "AWS_EXECUTION_ENV": "AWS_Lambda_nodejs20.x",
    }
    other = resolve("nodejs22.x", tmp_path, opt_root="/tmp/x/opt")
    assert other.env["NODE_PATH"].split(":")[:2] == [
        "/tmp/x/opt/nodejs/node22/node_modules",
        "/tmp/x/opt/nodejs/node_modules",
    ]
    assert other.env["AWS_EXECUTION_ENV"] == "AWS_Lambda_nodejs22.x"


@pytest.mark.node
@needs_node_ric
def test_node_entry_reads_handler_from_env(tmp_path: Path) -> None:
    assert NODE_RIC is not None
    cmd = resolve("nodejs20.x", tmp_path)
    entry = Path(cmd.argv[-1])
    text = entry.read_text()
    assert "_HANDLER" in text and "LAMBDA_TASK_ROOT" in text
    if entry.parent == runtime_dir_for("nodejs20.x", tmp_path):  # our entry around a bin that takes argv[2]
        assert NODE_RIC.as_uri() in text
        check = subprocess.run(["node", "--check", str(entry)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
    else:  # the package's own bin reads _HANDLER
        assert entry.is_relative_to(NODE_RIC)


@pytest.mark.node
@needs_node_ric
def test_node_wrapper(tmp_path: Path) -> None:
    plain = resolve("nodejs20.x", tmp_path)
    wrapped = resolve("nodejs20.x", tmp_path, wrapper="/opt/otel-handler")
    assert wrapped.argv == ("/opt/otel-handler", *plain.argv)


@pytest.mark.node
@needs_node_ric
def test_node_ric_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert NODE_RIC is not None
    monkeypatch.setenv("LAMBDABOX_NODE_RIC", str(NODE_RIC))
    assert find_node_ric() == NODE_RIC
    monkeypatch.setenv("LAMBDABOX_NODE_RIC", str(tmp_path))
    with pytest.raises(ConfigError, match="is not an aws-lambda-ric package directory"):
        resolve("nodejs20.x", tmp_path)


def test_node_ric_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDABOX_NODE_RIC", raising=False)
    monkeypatch.setattr(rt, "NODE_RIC_PROJECT_DIR", Path(".lambdabox-test-nothing-here"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"run scripts/install-node-ric\.sh"):
        resolve("nodejs20.x", tmp_path)
