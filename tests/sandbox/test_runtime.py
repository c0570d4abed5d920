"""How runtimes are started: Python commands and import isolation, wrappers, bootstraps, Node.js commands."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.contract import SUPPORTED_RUNTIMES
from lambdabox.core.errors import ConfigError
from lambdabox.sandbox import runtime as rt
from lambdabox.sandbox.runtime import PYTHON_BOOTSTRAP, RuntimeCommand, find_node_ric, runtime_dir_for
from runtime_support import BASE_PYTHON, PYTHONS, RUNNING, resolve, run_in

# --------------------------------------------------------------------------------------------------- python


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_python_command(runtime: str, runtime_cache: Path) -> None:
    cmd = resolve(runtime, runtime_cache)
    assert cmd.argv[-1] == str(PYTHON_BOOTSTRAP)
    assert cmd.argv[-1].endswith("python_bootstrap.py") and PYTHON_BOOTSTRAP.is_file()
    assert len(cmd.argv) == 2
    assert Path(cmd.argv[0]).name == runtime
    assert cmd.telemetry_fd is True
    assert dict(cmd.env) == {
        "PYTHONPATH": f"/var/task:/opt/python:/opt/python/lib/{runtime}/site-packages:"
        f"{runtime_cache}/runtime/{runtime}",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}",
    }
    assert cmd.path_prefix == (str(Path(cmd.argv[0]).parent),)
    assert runtime_dir_for(runtime, runtime_cache) == runtime_cache / "runtime" / runtime


@pytest.mark.slow
@pytest.mark.parametrize("runtime", PYTHONS)
def test_function_sees_runtime_packages_and_nothing_of_lambdabox(runtime: str, runtime_cache: Path) -> None:
    cmd = resolve(runtime, runtime_cache)
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
    runtime_dir = str(runtime_dir_for(runtime, runtime_cache))
    for name in ("awslambdaric", "boto3", "botocore"):
        assert found[name] is not None and found[name].startswith(runtime_dir + "/"), found[name]
    # lambdabox's own dependencies, lambdabox itself, and the base interpreter's extra packages stay out.
    for name in ("aiohttp", "click", "yaml", "lambdabox", "requests"):
        assert found[name] is None, (name, found[name])


@pytest.mark.slow
def test_function_code_and_layers_come_before_the_runtime_packages(runtime_cache: Path, tmp_path: Path) -> None:
    task, opt = tmp_path / "task", tmp_path / "opt"
    (task).mkdir()
    (opt / "python").mkdir(parents=True)
    (task / "boto3.py").write_text("WHO = 'task'\n")
    (opt / "python" / "botocore.py").write_text("WHO = 'layer'\n")
    cmd = resolve(RUNNING, runtime_cache, task_root=str(task), opt_root=str(opt))
    out = run_in(cmd, "import boto3, botocore; print(boto3.WHO, botocore.WHO)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["task", "layer"]


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
def test_wrapper_prefixes_the_command(runtime_cache: Path) -> None:
    plain = resolve(RUNNING, runtime_cache)
    wrapped = resolve(RUNNING, runtime_cache, wrapper="/opt/otel-instrument")
    assert wrapped.argv == ("/opt/otel-instrument", *plain.argv)
    assert wrapped.env == plain.env and wrapped.telemetry_fd == plain.telemetry_fd


@pytest.mark.slow
def test_wrapper_path_follows_the_roots_without_a_mount_namespace(runtime_cache: Path, tmp_path: Path) -> None:
    roots = {"task_root": str(tmp_path / "task"), "opt_root": str(tmp_path / "opt")}
    assert (
        resolve(RUNNING, runtime_cache, wrapper="/opt/otel-instrument", **roots).argv[0]
        == f"{tmp_path}/opt/otel-instrument"
    )
    assert resolve(RUNNING, runtime_cache, wrapper="/var/task/wrap.sh", **roots).argv[0] == f"{tmp_path}/task/wrap.sh"
    assert resolve(RUNNING, runtime_cache, wrapper="/usr/local/bin/w", **roots).argv[0] == "/usr/local/bin/w"
    assert resolve(RUNNING, runtime_cache, wrapper="/optional/w", **roots).argv[0] == "/optional/w"


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


@pytest.mark.parametrize(
    "runtime", ["java21", "ruby3.3", "dotnet8", "python2.7", "python3.8", "nodejs16.x", "nodejs", "go1.x", ""]
)
def test_unsupported_runtimes(runtime: str, tmp_path: Path) -> None:
    # The template loader refuses the same ones (one list, lambdabox.core.contract.SUPPORTED_RUNTIMES).
    with pytest.raises(ConfigError, match="is not supported by lambdabox") as caught:
        resolve(runtime, tmp_path)
    assert all(supported in str(caught.value) for supported in SUPPORTED_RUNTIMES)  # named in full
    with pytest.raises(ConfigError, match="is not supported by lambdabox"):
        runtime_dir_for(runtime, tmp_path)


@pytest.mark.parametrize("runtime", sorted(SUPPORTED_RUNTIMES))
def test_every_supported_runtime_is_recognised(runtime: str, tmp_path: Path) -> None:
    assert runtime_dir_for(runtime, tmp_path) == tmp_path / "runtime" / runtime


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
