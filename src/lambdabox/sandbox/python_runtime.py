"""The Python runtimes' installs in lambdabox's cache: a python3.X interpreter environment (Lambda's
/var/lang) and awslambdaric with boto3 (its /var/runtime), made once per runtime and reused by every function.
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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lambdabox.core.errors import ConfigError, SandboxError

PYTHON_RUNTIME_PACKAGES = ("boto3",)
"""What Lambda's managed Python runtimes ship besides awslambdaric."""

_MARKER = ".lambdabox-runtime.json"
_PIP_OUTPUT_TAIL = 4000


def ensure_python_runtime(runtime: str, minor: int, runtime_dir: Path, cache_dir: Path) -> Path:
    """Install awslambdaric and boto3 for ``runtime`` once, into ``runtime_dir`` (its LAMBDA_RUNTIME_DIR in
    ``cache_dir``); return the interpreter to run."""
    lang = _lang_dir(runtime, cache_dir)
    interpreter = lang / "bin" / runtime
    requirements = _requirements(minor)
    if interpreter.exists() and _packages_ready(runtime_dir, requirements):
        _open_to_all(runtime_dir)
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


def _open_to_all(directory: Path) -> None:
    """Make the runtime dir readable by all (a temporary directory is made 0700): inside an environment it is read
    by Lambda's user, as Lambda's /var/runtime is."""
    if directory.stat().st_mode & 0o005 != 0o005:
        directory.chmod(0o755)


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
        _open_to_all(staging)
        staging.rename(runtime_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _PIP_OUTPUT_TAIL else "...\n" + text[-_PIP_OUTPUT_TAIL:]
