"""How each Lambda runtime is started: the command line, its runtime-specific variables, and the runtime
client it runs (awslambdaric as python_runtime installs it, aws-lambda-ric from npm, a function's own bootstrap).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lambdabox.core.contract import NODEJS_RUNTIMES, OS_ONLY_RUNTIMES, PYTHON_RUNTIMES, SUPPORTED_RUNTIMES
from lambdabox.core.errors import ConfigError
from lambdabox.sandbox.python_runtime import ensure_python_runtime

PYTHON_BOOTSTRAP = Path(__file__).with_name("python_bootstrap.py")
"""The script every Python runtime runs (its path is the last argv element, as wrapper scripts expect)."""

NODE_RIC_ENV = "LAMBDABOX_NODE_RIC"
"""Environment variable naming an installed aws-lambda-ric package directory."""

NODE_RIC_PROJECT_DIR = Path(".lambdabox", "node")
"""Where scripts/install-node-ric.sh installs aws-lambda-ric, relative to a project (or this checkout)."""

_LAMBDA_PATH_DIRS = frozenset({"/usr/local/bin", "/usr/bin", "/bin"})


@dataclass(frozen=True)
class RuntimeCommand:
    """The process that runs a function's runtime, and what it adds to the function's environment.

    ``env`` holds runtime defaults (PYTHONPATH, NODE_PATH: unreserved, a function's own variables may
    override them, as in Lambda) and AWS_EXECUTION_ENV (reserved). ``path_prefix`` is the equivalent of
    Lambda's /var/lang/bin: directories to put before Lambda's PATH so that ``python3`` or ``node`` run
    by a wrapper script or by the function is the runtime's own interpreter.
    """

    argv: tuple[str, ...]  # the process to start (already including AWS_LAMBDA_EXEC_WRAPPER if set)
    env: Mapping[str, str]  # runtime-specific variables to add (PYTHONPATH, NODE_PATH, AWS_EXECUTION_ENV)
    telemetry_fd: bool  # True when the runtime writes awslambdaric's framed log descriptor
    path_prefix: tuple[str, ...] = field(default=())
    lang: str | None = None  # the host directory that is Lambda's /var/lang (its bin/ holds the interpreter)
    runtime_dir: str | None = None  # the host directory that is Lambda's /var/runtime (the runtime client)


def runtime_dir_for(runtime: str, cache_dir: Path) -> Path:
    """What becomes LAMBDA_RUNTIME_DIR for ``runtime``: ``cache_dir/runtime/<runtime>``."""
    if runtime not in SUPPORTED_RUNTIMES:
        raise _unsupported(runtime)
    return cache_dir / "runtime" / runtime


def resolve_runtime(
    runtime: str,
    *,
    task_root: str,
    opt_root: str,
    wrapper: str | None,
    cache_dir: Path,
    host_task_root: str | None = None,
    host_opt_root: str | None = None,
    lambda_layout: bool = False,
) -> RuntimeCommand:
    """The command that starts ``runtime``, installing its runtime client into ``cache_dir`` on first use.

    ``task_root`` and ``opt_root`` are the paths the function sees (/var/task and /opt, or host
    directories when there is no mount namespace); ``host_task_root`` and ``host_opt_root`` are where
    lambdabox finds the same files (default: the same paths); ``wrapper`` is AWS_LAMBDA_EXEC_WRAPPER;
    ``lambda_layout``: the environment shows the runtime's interpreter at /var/lang and its client at /var/runtime
    (``RuntimeCommand.lang`` and ``runtime_dir``), so the command names them there.
    """
    runtime_root = "/var/runtime" if lambda_layout else None
    if runtime in PYTHON_RUNTIMES:
        minor = int(runtime.removeprefix("python3."))
        cmd = _python_command(runtime, minor, task_root, opt_root, cache_dir, runtime_root)
    elif runtime in NODEJS_RUNTIMES:
        major = int(runtime.removeprefix("nodejs").removesuffix(".x"))
        cmd = _node_command(runtime, major, opt_root, cache_dir, runtime_root)
    elif runtime in OS_ONLY_RUNTIMES:
        # Lambda does not apply AWS_LAMBDA_EXEC_WRAPPER to OS-only runtimes.
        host = (host_task_root or task_root, host_opt_root or opt_root)
        bootstrap = _find_bootstrap(runtime, *host)
        seen = _lambda_path(bootstrap, task_root=task_root, opt_root=opt_root, host=host)
        return RuntimeCommand(argv=(seen,), env={}, telemetry_fd=False)
    else:
        raise _unsupported(runtime)
    if wrapper:
        argv = (_lambda_path(wrapper, task_root=task_root, opt_root=opt_root), *cmd.argv)
        cmd = dataclasses.replace(cmd, argv=argv)
    return cmd


def _unsupported(runtime: str) -> ConfigError:
    return ConfigError(
        f"runtime {runtime} is not supported by lambdabox (supported: {', '.join(sorted(SUPPORTED_RUNTIMES))})"
    )


def _lambda_path(path: str, *, task_root: str, opt_root: str, host: tuple[str, str] | None = None) -> str:
    """``path`` under the ``host`` roots (task, opt), or as written for Lambda (/opt/..., /var/task/...),
    mapped onto the roots the function sees."""
    host_task, host_opt = host or ("/var/task", "/opt")
    for lambda_root, root in ((host_opt, opt_root), (host_task, task_root)):
        if root != lambda_root and (path == lambda_root or path.startswith(lambda_root + "/")):
            return root + path[len(lambda_root) :]
    return path


# --------------------------------------------------------------------------------------------- provided.*


def _find_bootstrap(runtime: str, task_root: str, opt_root: str) -> str:
    """The first ``bootstrap`` that exists, in Lambda's order: the function's code, then its layers."""
    candidates = [Path(task_root, "bootstrap"), Path(opt_root, "bootstrap")]
    for candidate in candidates:
        if candidate.exists():
            if not candidate.is_file() or not os.access(candidate, os.X_OK):
                raise ConfigError(f"runtime {runtime}: {candidate} exists but is not an executable file")
            return str(candidate)
    raise ConfigError(
        f"runtime {runtime} needs an executable bootstrap in the function code or a layer: "
        f"neither {candidates[0]} nor {candidates[1]} exists"
    )


# ------------------------------------------------------------------------------------------------ python


def _python_command(
    runtime: str, minor: int, task_root: str, opt_root: str, cache_dir: Path, runtime_root: str | None
) -> RuntimeCommand:
    runtime_dir = runtime_dir_for(runtime, cache_dir)
    interpreter = ensure_python_runtime(runtime, minor, runtime_dir, cache_dir)
    pythonpath = [
        task_root,
        f"{opt_root}/python",
        f"{opt_root}/python/lib/{runtime}/site-packages",
        runtime_root or str(runtime_dir),
    ]
    seen = f"/var/lang/bin/{interpreter.name}" if runtime_root else str(interpreter)
    return RuntimeCommand(
        argv=(seen, str(PYTHON_BOOTSTRAP)),
        env={"PYTHONPATH": ":".join(pythonpath), "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}"},
        telemetry_fd=True,
        path_prefix=(str(interpreter.parent),),
        lang=str(interpreter.parent.parent),  # the runtime's venv: bin/python3.x, and its pyvenv.cfg
        runtime_dir=str(runtime_dir),
    )


# -------------------------------------------------------------------------------------------------- node


def find_node_ric() -> Path:
    """The aws-lambda-ric package directory: $LAMBDABOX_NODE_RIC, else ``.lambdabox/node`` of the current
    project or of this lambdabox checkout (where scripts/install-node-ric.sh puts it)."""
    explicit = os.environ.get(NODE_RIC_ENV)
    if explicit:
        if not _is_node_ric(Path(explicit)):
            raise ConfigError(f"{NODE_RIC_ENV}={explicit} is not an aws-lambda-ric package directory")
        return Path(explicit).resolve()
    checkout = Path(__file__).resolve().parents[3]
    for project in (Path.cwd(), checkout):
        candidate = project / NODE_RIC_PROJECT_DIR / "node_modules" / "aws-lambda-ric"
        if _is_node_ric(candidate):
            return candidate.resolve()
    raise ConfigError(
        "nodejs runtimes need aws-lambda-ric from npm: run scripts/install-node-ric.sh "
        f"(or set {NODE_RIC_ENV} to an installed aws-lambda-ric package directory)"
    )


def _is_node_ric(package_dir: Path) -> bool:
    try:
        meta = json.loads((package_dir / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("name") == "aws-lambda-ric"


def _node_entries(package_dir: Path) -> tuple[Path, Path]:
    """The package's ``bin`` script and its ``main`` module, as its package.json declares them."""
    meta = json.loads((package_dir / "package.json").read_text())
    bin_field = meta.get("bin")
    if isinstance(bin_field, dict):
        bin_field = bin_field.get("aws-lambda-ric") or next(iter(bin_field.values()), None)
    if not isinstance(bin_field, str):
        raise ConfigError(f"{package_dir}/package.json declares no bin for aws-lambda-ric")
    main = meta.get("main") if isinstance(meta.get("main"), str) else bin_field
    return (package_dir / bin_field).resolve(), (package_dir / main).resolve()


_NODE_ENTRY = """\
// Written by lambdabox: Lambda's /var/runtime/index.mjs for {ric}.
// That package's bin takes the handler from argv[2] and the app root from the working directory; Lambda
// takes them from _HANDLER and LAMBDA_TASK_ROOT (which wrapper scripts may rewrite), so do that here.
const appRoot = process.env.LAMBDA_TASK_ROOT || process.cwd();
const handler = process.env._HANDLER || "";
process.chdir(appRoot);
const ric = await import({main});
if (typeof ric.run === "function") {{
  await ric.run(appRoot, handler);  // what its bin does, without its "Executing ..." line on stdout
}} else {{
  process.argv.splice(2, process.argv.length - 2, handler);
  await import({bin});
}}
"""


def _node_command(runtime: str, major: int, opt_root: str, cache_dir: Path, runtime_root: str | None) -> RuntimeCommand:
    node = shutil.which("node")
    if node is None:
        raise ConfigError(f"runtime {runtime} needs a local node on PATH")
    package_dir = find_node_ric()
    bin_script, main = _node_entries(package_dir)
    runtime_dir = runtime_dir_for(runtime, cache_dir)
    if "_HANDLER" in bin_script.read_text(errors="replace"):
        # aws-lambda-ric 4 and later read _HANDLER and LAMBDA_TASK_ROOT themselves.
        entry = bin_script
    else:
        entry = runtime_dir / "index.mjs"
        _write_if_changed(
            entry,
            _NODE_ENTRY.format(
                ric=package_dir,
                main=json.dumps(main.as_uri()),
                bin=json.dumps(bin_script.as_uri()),
            ),
        )
    seen_runtime = runtime_root or str(runtime_dir)
    if entry.parent == runtime_dir:
        entry = Path(seen_runtime) / entry.name
    node_path = [
        f"{opt_root}/nodejs/node{major}/node_modules",
        f"{opt_root}/nodejs/node_modules",
        f"{seen_runtime}/node_modules",
    ]
    return RuntimeCommand(
        argv=("/var/lang/bin/node" if runtime_root else node, str(entry)),
        env={"NODE_PATH": ":".join(node_path), "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}"},
        telemetry_fd=True,  # both major versions write the same 0xA55A0003 frames to _LAMBDA_TELEMETRY_LOG_FD
        # Lambda's /var/lang/bin; not when node is already in a directory of Lambda's PATH.
        path_prefix=() if os.path.dirname(node) in _LAMBDA_PATH_DIRS else (os.path.dirname(node),),
        lang=os.path.dirname(os.path.dirname(os.path.realpath(node))),  # its bin/node
        runtime_dir=str(runtime_dir),
    )


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text and path.stat().st_mode & 0o004:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        os.fchmod(f.fileno(), 0o644)  # read inside by Lambda's user (mkstemp makes it 0600)
    os.replace(tmp, path)
