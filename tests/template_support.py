"""Test support for the template tests: templates written next to a code and a layer directory, loaded or refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lambdabox.core.errors import TemplateError
from lambdabox.core.model import FunctionConfig
from lambdabox.template.load import load_template


def write(tmp_path: Path, body: str, name: str = "template.yaml") -> Path:
    """A template (dedented) next to a src/ code directory and a layer/ directory."""
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "app.py").write_text("def handler(event, context):\n    return event\n")
    (tmp_path / "layer").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def one(tmp_path: Path, body: str, overrides: dict[str, str] | None = None) -> FunctionConfig:
    return load_template(write(tmp_path, body), overrides).function(None)


def function_yaml(extra: str = "", *, runtime: str = "python3.12", name: str = "Fn") -> str:
    """A template with one function; ``extra`` is more of its Properties (indented by 6)."""
    lines = textwrap.indent(textwrap.dedent(extra).strip("\n") + "\n", " " * 6) if extra.strip() else ""
    return (
        "Resources:\n"
        f"  {name}:\n"
        "    Type: AWS::Serverless::Function\n"
        "    Properties:\n"
        "      CodeUri: src\n"
        "      Handler: app.handler\n"
        f"      Runtime: {runtime}\n"
        f"{lines}"
    )


def refused(tmp_path: Path, body: str, *fragments: str, overrides: dict[str, str] | None = None) -> str:
    """Load ``body``; assert a TemplateError naming the file and every fragment; return its message."""
    path = write(tmp_path, body)
    with pytest.raises(TemplateError) as caught:
        load_template(path, overrides).function(None)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message
