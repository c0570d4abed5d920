"""How each Lambda runtime is started: the command line, its runtime-specific variables, and the runtime
clients it needs (awslambdaric per Python version, aws-lambda-ric from npm, a function's own bootstrap).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import json
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lambdabox.core.errors import ConfigError, SandboxError

PYTHON_BOOTSTRAP = Path(__file__).with_name("python_bootstrap.py")
"""The script every Python runtime runs (its path is the last argv element, as wrapper scripts expect)."""

NODE_RIC_ENV = "LAMBDABOX_NODE_RIC"
"""Environment variable naming an installed aws-lambda-ric package directory."""

NODE_RIC_PROJECT_DIR = Path(".lambdabox", "node")
"""Where scripts/install-node-ric.sh installs aws-lambda-ric, relative to a project (or this checkout)."""

PYTHON_RUNTIME_PACKAGES = ("boto3",)
"""What Lambda's managed Python runtimes ship besides awslambdaric."""

_MARKER = ".lambdabox-runtime.json"
_PYTHON_RE = re.compile(r"python3\.(\d+)")
_NODE_RE = re.compile(r"nodejs(\d+)\.x")
_PROVIDED = frozenset({"provided", "provided.al2", "provided.al2023"})
_PIP_OUTPUT_TAIL = 4000
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


def runtime_dir_for(runtime: str, cache_dir: Path) -> Path:
    """What becomes LAMBDA_RUNTIME_DIR for ``runtime``: ``cache_dir/runtime/<runtime>``."""
    if not (_PYTHON_RE.fullmatch(runtime) or _NODE_RE.fullmatch(runtime) or runtime in _PROVIDED):
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
) -> RuntimeCommand:
    """The command that starts ``runtime``, installing its runtime client into ``cache_dir`` on first use.

    ``task_root`` and ``opt_root`` are the paths the function sees (/var/task and /opt, or host
    directories when there is no mount namespace); ``host_task_root`` and ``host_opt_root`` are where
    lambdabox finds the same files (default: the same paths); ``wrapper`` is AWS_LAMBDA_EXEC_WRAPPER.
    """
    if m := _PYTHON_RE.fullmatch(runtime):
        cmd = _python_command(runtime, int(m.group(1)), task_root, opt_root, cache_dir)
    elif m := _NODE_RE.fullmatch(runtime):
        cmd = _node_command(runtime, int(m.group(1)), opt_root, cache_dir)
    elif runtime in _PROVIDED:
        # Lambda does not apply AWS_LAMBDA_EXEC_WRAPPER to OS-only runtimes.
        host = (host_task_root or task_root, host_opt_root or opt_root)
        bootstrap = _find_bootstrap(runtime, *host)
        seen = _lambda_path(bootstrap, task_root=task_root, opt_root=opt_root, host=host)
        return RuntimeCommand(argv=(seen,), env={}, telemetry_fd=False)
    else:
        raise _unsupported(runtime)
    if wrapper:
        argv = (_lambda_path(wrapper, task_root=task_root, opt_root=opt_root), *cmd.argv)
        cmd = RuntimeCommand(argv=argv, env=cmd.env, telemetry_fd=cmd.telemetry_fd, path_prefix=cmd.path_prefix)
    return cmd


def _unsupported(runtime: str) -> ConfigError:
    return ConfigError(
        f"runtime {runtime} is not supported by lambdabox "
        "(supported: python3.X, nodejsNN.x, provided, provided.al2, provided.al2023)"
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


def _python_command(runtime: str, minor: int, task_root: str, opt_root: str, cache_dir: Path) -> RuntimeCommand:
    runtime_dir = runtime_dir_for(runtime, cache_dir)
    interpreter = _ensure_python_runtime(runtime, minor, cache_dir)
    pythonpath = [
        task_root,
        f"{opt_root}/python",
        f"{opt_root}/python/lib/{runtime}/site-packages",
        str(runtime_dir),
    ]
    return RuntimeCommand(
        argv=(str(interpreter), str(PYTHON_BOOTSTRAP)),
        env={"PYTHONPATH": ":".join(pythonpath), "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}"},
        telemetry_fd=True,
        path_prefix=(str(interpreter.parent),),
    )


def _lang_dir(runtime: str, cache_dir: Path) -> Path:
    """A venv without pip around the base interpreter (Lambda's /var/lang): it sees no site-packages but
    its own empty one, so neither lambdabox's venv nor the base interpreter's packages reach the function."""
    return cache_dir / "lang" / runtime


@functools.cache  # reading the installed metadata costs a scan of sys.path, on every cold start otherwise
def _awslambdaric_requirement(minor: int) -> str:
    """awslambdaric pinned to lambdabox's own version, or the newest older one that supports ``3.minor``."""
    version = importlib.metadata.version("awslambdaric")
    meta = importlib.metadata.metadata("awslambdaric")
    requires = (meta.get_all("Requires-Python") or [""])[0]
    if _python_satisfies((3, minor), requires):
        return f"awslambdaric=={version}"
    return f"awslambdaric<{version}"


def _python_satisfies(version: tuple[int, int], requires: str) -> bool:
    """Whether ``version`` meets a simple Requires-Python (``>=3.10``, ``>=3.9,<4``); unknown clauses pass."""
    ops = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
    ops["!="] = operator.ne
    for clause in filter(None, (c.strip() for c in requires.split(","))):
        m = re.fullmatch(r"(>=|<=|==|!=|>|<)\s*(\d+)(?:\.(\d+))?(?:\.[\d*]+)*", clause)
        if not m:
            continue
        bound = (int(m.group(2)), int(m.group(3) or 0))
        if not ops[m.group(1)](version, bound):
            return False
    return True


def _requirements(minor: int) -> list[str]:
    return [_awslambdaric_requirement(minor), *PYTHON_RUNTIME_PACKAGES]


def _packages_ready(runtime_dir: Path, requirements: list[str]) -> bool:
    try:
        marker = json.loads((runtime_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("requirements") == requirements


def _ensure_python_runtime(runtime: str, minor: int, cache_dir: Path) -> Path:
    """Install awslambdaric and boto3 for ``runtime`` once; return the interpreter to run."""
    runtime_dir = runtime_dir_for(runtime, cache_dir)
    lang = _lang_dir(runtime, cache_dir)
    interpreter = lang / "bin" / runtime
    requirements = _requirements(minor)
    if interpreter.exists() and _packages_ready(runtime_dir, requirements):
        return interpreter
    with _locked(cache_dir / "runtime" / f"{runtime}.lock"):
        lang_ready = interpreter.exists()  # false too when the base interpreter it links to is gone
        packages_ready = _packages_ready(runtime_dir, requirements)
        if lang_ready and packages_ready:
            return interpreter
        base = find_python(minor)
        if not lang_ready:
            _make_lang(runtime, base, lang)
        if not packages_ready:
            _pip_install(runtime, base, runtime_dir, requirements)
    return interpreter


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_python(minor: int) -> Path:
    """The base (non-venv) interpreter for python3.``minor``: this process's own when it is that version,
    else the first working ``python3.minor`` on PATH or in pyenv's or uv's interpreter directories."""
    if sys.version_info[:2] == (3, minor):
        return Path(getattr(sys, "_base_executable", "") or sys.executable)
    name = f"python3.{minor}"
    candidates: list[Path] = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidates.append(Path(d or ".", name))
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates += _newest_first((pyenv_root / "versions").glob(f"3.{minor}.*"), "bin", name)
    uv_root = Path(os.environ.get("UV_PYTHON_INSTALL_DIR") or Path.home() / ".local/share/uv/python")
    candidates += _newest_first(uv_root.glob(f"cpython-3.{minor}.*"), "bin", name)
    seen: set[Path] = set()
    for candidate in candidates:
        if candidate in seen or not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        seen.add(candidate)
        found = _probe_python(candidate, minor)
        if found is not None:
            return found
    raise ConfigError(f"runtime python3.{minor} needs a local python3.{minor} interpreter on PATH")


def _newest_first(dirs: Iterable[Path], *parts: str) -> list[Path]:
    def key(d: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", d.name)[:3])

    return [Path(d, *parts) for d in sorted(dirs, key=key, reverse=True)]


_PROBE = """\
import os, sys
exe = sys.executable
if sys.prefix != sys.base_prefix:  # a venv: name its base interpreter instead
    base = os.path.join(sys.base_prefix, "bin", os.path.basename(exe))
    exe = base if os.path.exists(base) else (getattr(sys, "_base_executable", "") or exe)
print(sys.version_info[0], sys.version_info[1], exe)
"""


def _probe_python(candidate: Path, minor: int) -> Path | None:
    """``candidate``'s real interpreter if it runs and is python3.``minor`` (pyenv shims of versions that
    are not selected fail here)."""
    try:
        out = subprocess.run(
            [str(candidate), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.gettempdir(),  # not the caller's directory: a .python-version there steers pyenv
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.strip().split(" ", 2)
    if out.returncode != 0 or len(parts) != 3 or parts[:2] != ["3", str(minor)]:
        return None
    return Path(parts[2])


def _make_lang(runtime: str, base: Path, lang: Path) -> None:
    shutil.rmtree(lang, ignore_errors=True)
    lang.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [str(base), "-I", "-m", "venv", "--without-pip", str(lang)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not (lang / "bin" / runtime).exists():
        raise SandboxError(
            f"runtime {runtime}: could not create its interpreter environment with {base} -m venv:\n"
            f"{_tail(out.stdout + out.stderr)}"
        )


def _pip_install(runtime: str, base: Path, runtime_dir: Path, requirements: list[str]) -> None:
    """``pip install --target`` into a fresh directory, then swap it in as the runtime dir."""
    runtime_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{runtime}.", dir=runtime_dir.parent))
    try:
        out = subprocess.run(
            [
                str(base),
                "-I",
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--no-warn-script-location",
                "--target",
                str(staging),
                *requirements,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SandboxError(
                f"runtime {runtime}: installing {' '.join(requirements)} with {base} -m pip failed "
                f"(exit {out.returncode}):\n{_tail(out.stdout)}"
            )
        shutil.rmtree(staging / "bin", ignore_errors=True)  # console scripts of the target install
        (staging / _MARKER).write_text(
            json.dumps({"requirements": requirements, "interpreter": str(base)}, indent=2) + "\n"
        )
        if runtime_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{runtime}.old.", dir=runtime_dir.parent))
            runtime_dir.rename(old / "dir")
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(runtime_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _PIP_OUTPUT_TAIL else "...\n" + text[-_PIP_OUTPUT_TAIL:]


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


def _node_command(runtime: str, major: int, opt_root: str, cache_dir: Path) -> RuntimeCommand:
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
    node_path = [
        f"{opt_root}/nodejs/node{major}/node_modules",
        f"{opt_root}/nodejs/node_modules",
        f"{runtime_dir}/node_modules",
    ]
    return RuntimeCommand(
        argv=(node, str(entry)),
        env={"NODE_PATH": ":".join(node_path), "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}"},
        telemetry_fd=True,  # both major versions write the same 0xA55A0003 frames to _LAMBDA_TELEMETRY_LOG_FD
        # Lambda's /var/lang/bin; not when node is already in a directory of Lambda's PATH.
        path_prefix=() if os.path.dirname(node) in _LAMBDA_PATH_DIRS else (os.path.dirname(node),),
    )


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
