"""Template files into documents: JSON and YAML, and every file that is not a template refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdabox.core.errors import TemplateError
from lambdabox.template.load import load_template
from template_support import refused, write


def test_json_template(tmp_path: Path) -> None:
    body = {
        "Resources": {
            "Fn": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "CodeUri": "src",
                    "Handler": "app.handler",
                    "Runtime": "python3.13",
                    "FunctionName": {"Fn::Sub": "${AWS::StackName}-fn"},
                },
            }
        }
    }
    path = write(tmp_path, json.dumps(body, indent="\t"), name="template.json")
    assert load_template(path).function(None).function_name == "lambdabox-fn"


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ("- just\n- a list\n", "must be a mapping with a Resources section"),
        ("AWSTemplateFormatVersion: '2010-09-09'\n", "non-empty Resources"),
        ("Resources: {}\n", "non-empty Resources"),
        ("Resources:\n\tFn: x\n", "not valid YAML: line 2, column 1"),
        ("Resources:\n  Fn: {Type: X}\n  Bad: a: b\n", "not valid YAML: line 3"),
        ("Resources:\n  Fn: !Bogus x\n", "not valid YAML: line 2"),
        ("Resources:\n  A: {Type: X}\n  A: {Type: Y}\n", "duplicate key 'A'"),
    ],
)
def test_bad_template_files_are_refused(tmp_path: Path, body: str, rule: str) -> None:
    refused(tmp_path, body, rule)


def test_missing_template_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="template file not found") as caught:
        load_template(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(caught.value)
