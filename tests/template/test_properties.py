"""Lambda's rules for a function's properties: FunctionName, Runtime, Handler, Timeout, MemorySize, concurrency,
the layer limit, and Environment variables (names, reserved names, size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.contract import RESERVED_ENVIRONMENT_VARIABLES, SUPPORTED_RUNTIMES
from template_support import function_yaml, one, refused


def test_bad_function_name_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, function_yaml("FunctionName: 'has space'"), "Fn", "FunctionName 'has space'")


@pytest.mark.parametrize("runtime", ["python3.8", "nodejs16.x", "java21", "ruby3.3", "dotnet8", "go1.x"])
def test_unsupported_runtime_is_refused(tmp_path: Path, runtime: str) -> None:
    refused(tmp_path, function_yaml(runtime=runtime), "Fn", f"Runtime {runtime!r} is not supported")


def test_supported_runtimes() -> None:
    assert {"python3.9", "python3.14", "nodejs18.x", "nodejs24.x", "provided.al2023"} <= SUPPORTED_RUNTIMES
    assert "python3.8" not in SUPPORTED_RUNTIMES
    assert len(SUPPORTED_RUNTIMES) == 13


@pytest.mark.parametrize("runtime", sorted(SUPPORTED_RUNTIMES))
def test_every_supported_runtime_is_loaded(tmp_path: Path, runtime: str) -> None:
    assert one(tmp_path, function_yaml(runtime=runtime)).runtime == runtime


def test_missing_handler_is_refused_except_for_provided_runtimes(tmp_path: Path) -> None:
    body = function_yaml().replace("      Handler: app.handler\n", "")
    refused(tmp_path, body, "Fn", "Handler is missing; runtime python3.12 needs one")
    for runtime in ("provided", "provided.al2", "provided.al2023"):
        assert one(tmp_path, function_yaml(runtime=runtime).replace("      Handler: app.handler\n", "")).handler == ""


LIMIT_CASES = [("Timeout", 0), ("Timeout", 901), ("Timeout", "1.5"), ("MemorySize", 127), ("MemorySize", 10241)]


@pytest.mark.parametrize(
    ("prop", "value"),
    [
        *LIMIT_CASES,
        ("MemorySize", "big"),
        ("ReservedConcurrentExecutions", -1),
        ("ProvisionedConcurrencyConfig", "{ProvisionedConcurrentExecutions: many}"),
    ],
)
def test_limits_out_of_range_are_refused(tmp_path: Path, prop: str, value: Any) -> None:
    refused(tmp_path, function_yaml(f"{prop}: {value}"), "Fn", prop, "must be a whole number from")


@pytest.mark.parametrize(("timeout", "memory"), [(1, 128), (900, 10240)])
def test_limits_at_the_edges_are_accepted(tmp_path: Path, timeout: int, memory: int) -> None:
    config = one(tmp_path, function_yaml(f"Timeout: {timeout}\nMemorySize: {memory}"))
    assert (config.timeout_s, config.memory_mb) == (float(timeout), memory)


def test_more_than_five_layers_is_refused(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"l{i}").mkdir()
    assert len(one(tmp_path, function_yaml("Layers: [l0, l1, l2, l3, l4]")).layers) == 5
    refused(tmp_path, function_yaml("Layers: [l0, l1, l2, l3, l4, l5]"), "Fn", "6 layers", "at most 5")


def test_layers_from_globals_count_towards_the_limit(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"l{i}").mkdir()
    body = "Globals:\n  Function:\n    Layers: [l0, l1, l2]\n" + function_yaml("Layers: [l3, l4, l5]")
    refused(tmp_path, body, "Fn", "6 layers")


def test_environment_over_4_kb_is_refused(tmp_path: Path) -> None:
    exactly = "A" * (4096 - 2)  # key "AB" + value: 4096 bytes in all
    assert len(one(tmp_path, function_yaml(f"Environment: {{Variables: {{AB: {exactly}}}}}")).environment["AB"]) == 4094
    refused(
        tmp_path, function_yaml(f"Environment: {{Variables: {{AB: {exactly}X}}}}"), "Fn", "4097 bytes", "at most 4096"
    )


def test_environment_size_counts_bytes_not_characters(tmp_path: Path) -> None:
    value = "é" * 2047  # 4094 bytes, 2047 characters
    refused(tmp_path, function_yaml(f"Environment: {{Variables: {{ABC: {value}}}}}"), "Fn", "4097 bytes")


@pytest.mark.parametrize("name", sorted(RESERVED_ENVIRONMENT_VARIABLES))
def test_reserved_environment_variable_is_refused(tmp_path: Path, name: str) -> None:
    fragment = f"Environment variable {name} is reserved by Lambda and cannot be set"
    refused(tmp_path, function_yaml(f"Environment: {{Variables: {{{name}: x}}}}"), "Fn", fragment)


def test_reserved_names_are_the_documented_ones() -> None:
    assert len(RESERVED_ENVIRONMENT_VARIABLES) == 18
    assert {"_HANDLER", "AWS_REGION", "LAMBDA_TASK_ROOT", "AWS_LAMBDA_RUNTIME_API"} <= RESERVED_ENVIRONMENT_VARIABLES
    assert {"_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION"} <= RESERVED_ENVIRONMENT_VARIABLES
    assert "TZ" not in RESERVED_ENVIRONMENT_VARIABLES  # unreserved in the current Developer Guide


@pytest.mark.parametrize("variables", ["{1A: x}", "{A: x}", "{A-B: x}", "{AB: }", "{AB: [x]}"])
def test_bad_environment_variables_are_refused(tmp_path: Path, variables: str) -> None:
    refused(tmp_path, function_yaml(f"Environment: {{Variables: {variables}}}"), "Fn", "Environment variable")
