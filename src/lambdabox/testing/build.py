"""Functions for tests, from a template or given inline: code and layers as directories, zips, or {path: content}
built into zips in a temporary directory that goes away with the function.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lambdabox.core.model import FunctionConfig, LayerConfig
from lambdabox.environment.options import Options
from lambdabox.template.load import load_template
from lambdabox.testing.function import START_TIMEOUT_S, LambdaFunction

PYTHON_RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"  # the interpreter running the tests
Files = Mapping[str, str | bytes | Path]  # path inside the code or layer -> its content, or a file to copy
_ALIASES = {"timeout": "timeout_s", "memory": "memory_mb"}


def function_from_code(
    *,
    code: Files | str | Path,
    handler: str = "app.handler",
    runtime: str = PYTHON_RUNTIME,
    layers: Sequence[Files | str | Path] = (),
    extensions: Files | None = None,
    environment: Mapping[str, str] | None = None,
    timeout: float = 3.0,
    memory: int = 128,
    name: str = "Function",
    options: Options | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> LambdaFunction:
    """Start a function given inline. ``code`` and each layer: a directory, a .zip, or {path: content}; files whose
    content starts with ``#!`` are executable. ``extensions``: {name: script text, bytes or file}, put in a last
    layer at ``extensions/<name>``."""
    return _started(
        lambda work: FunctionConfig(
            logical_id=name,
            function_name=name,
            runtime=runtime,
            handler=handler,
            code=_code(work, code),
            layers=_layers(work, layers, extensions),
            environment=dict(environment or {}),
            timeout_s=timeout,
            memory_mb=memory,
        ),
        options,
        start_timeout,
    )


def function_from_template(
    path: str | Path,
    name: str | None = None,
    *,
    parameter_overrides: Mapping[str, str] | None = None,
    options: Options | None = None,
    start_timeout: float = START_TIMEOUT_S,
    **overrides: Any,
) -> LambdaFunction:
    """Start a template's function (``name``: its logical id or FunctionName; None when it has only one).
    ``overrides`` change its settings: ``timeout``, ``memory``, ``environment`` (merged over the template's),
    ``layers`` (instead of the template's), ``extensions`` (added as a last layer), or any FunctionConfig field."""
    config = load_template(Path(path), parameter_overrides).function(name)

    def configure(work: Path) -> FunctionConfig:
        changes = {_ALIASES.get(key, key): value for key, value in overrides.items()}
        if "environment" in changes:
            changes["environment"] = {**config.environment, **changes["environment"]}
        layers, extensions = changes.pop("layers", None), changes.pop("extensions", None)
        if layers is not None or extensions is not None:
            given = config.layers if layers is None else _layers(work, layers, None)
            changes["layers"] = given + _layers(work, (), extensions)
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(FunctionConfig)})
        if unknown:
            raise TypeError(f"function_from_template: unknown override {', '.join(unknown)} for {config.logical_id}")
        return dataclasses.replace(config, **changes)

    return _started(configure, options, start_timeout)


def _started(configure: Callable[[Path], FunctionConfig], options: Options | None, timeout: float) -> LambdaFunction:
    work = Path(tempfile.mkdtemp(prefix="lambdabox-test-"))
    try:
        return LambdaFunction(
            configure(work), options, start_timeout=timeout, cleanup=lambda: shutil.rmtree(work, ignore_errors=True)
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _code(work: Path, code: Files | str | Path) -> Path:
    if isinstance(code, str | Path):
        return Path(code).absolute()
    directory = work / "code"
    for entry, content in code.items():
        target = directory / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        data = _content(content)
        target.write_bytes(data)
        target.chmod(0o755 if data.startswith(b"#!") else 0o644)
    return directory


def _layers(work: Path, layers: Iterable[Files | str | Path], extensions: Files | None) -> tuple[LayerConfig, ...]:
    built = []
    for layer in layers:
        if isinstance(layer, str | Path):
            built.append(LayerConfig(Path(layer).name, Path(layer).absolute()))
        else:
            name = f"layer{len(list(work.glob('layer*.zip'))) + 1}"
            built.append(LayerConfig(name, _zip(work / f"{name}.zip", layer)))
    if extensions:
        files = {f"extensions/{name}": content for name, content in extensions.items()}
        built.append(LayerConfig("extensions", _zip(work / "extensions.zip", files, executable=True)))
    return tuple(built)


def _zip(path: Path, files: Files, *, executable: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for entry, content in files.items():
            data = _content(content)
            info = zipfile.ZipInfo(entry)
            info.external_attr = (0o100000 | (0o755 if executable or data.startswith(b"#!") else 0o644)) << 16
            archive.writestr(info, data)
    return path


def _content(content: str | bytes | Path) -> bytes:
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode() if isinstance(content, str) else content
