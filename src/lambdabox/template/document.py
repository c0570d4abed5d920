"""Reads a template file, YAML (with CloudFormation's short forms) or JSON, into its document and top-level
sections, refusing (TemplateError) a file that is not a template.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Final

import yaml

from lambdabox.core.errors import TemplateError
from lambdabox.template.intrinsic import load_yaml

_MISSING: Final = object()


def read_document(source: Path) -> dict[str, Any]:
    """The document in the template file ``source``: a mapping with a non-empty Resources mapping."""
    where = str(source)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(where, None, "template file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(where, None, f"cannot read the template: {exc}") from None
    document: Any = _MISSING
    if text.lstrip().startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):  # else YAML reports the error with its line
            document = json.loads(text)
    if document is _MISSING:
        try:
            document = load_yaml(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = exc.problem or exc.context or "invalid YAML"
            raise TemplateError(where, None, f"not valid YAML: {line}{problem}") from None
        except yaml.YAMLError as exc:
            raise TemplateError(where, None, f"not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise TemplateError(where, None, "a template must be a mapping with a Resources section")
    resources = document.get("Resources")
    if not isinstance(resources, dict) or not resources:
        raise TemplateError(where, None, "a template must have a non-empty Resources mapping")
    return document


def read_section(document: dict[str, Any], source: str, name: str) -> dict[str, Any]:
    """The top-level section ``name`` (Parameters, Globals, Mappings, Conditions): a mapping, empty if absent."""
    value = document.get(name) or {}
    if not isinstance(value, dict):
        raise TemplateError(source, name, f"{name} must be a mapping")
    return value
