"""The rules Lambda applies to a function's property values once resolved: FunctionName, Runtime, Handler,
its limits (Timeout, MemorySize, concurrency, at most five Layers) and its Environment variables.
"""

from __future__ import annotations

import re
from typing import Any, Final

from lambdabox.core.contract import RESERVED_ENVIRONMENT_VARIABLES, SUPPORTED_RUNTIMES
from lambdabox.template.eventconfig import Fail
from lambdabox.template.intrinsic import Unresolvable, scalar_text

MAX_LAYERS: Final = 5
MAX_ENVIRONMENT_BYTES: Final = 4096
TIMEOUT_RANGE: Final = (1, 900)
MEMORY_RANGE: Final = (128, 10240)
EPHEMERAL_STORAGE_RANGE: Final = (512, 10240)  # API_EphemeralStorage: /tmp in MB, default 512
DEFAULT_EPHEMERAL_STORAGE_MB: Final = 512
DEFAULT_TIMEOUT_S: Final = 3
DEFAULT_MEMORY_MB: Final = 128

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]+")
_ENV_KEY_RULE = "names start with a letter, have two characters or more, and hold only letters, digits and _"


def read_function_name(value: Any, fail: Fail) -> str:
    """``FunctionName`` as Lambda accepts it."""
    if not isinstance(value, str) or not _FUNCTION_NAME.fullmatch(value):
        fail(f"FunctionName {value!r} must be 1 to 64 letters, digits, hyphens or underscores")
    return value


def read_runtime(value: Any, fail: Fail) -> str:
    """``Runtime``, one that lambdabox runs."""
    if not isinstance(value, str) or value not in SUPPORTED_RUNTIMES:
        fail(f"Runtime {value!r} is not supported; supported: {', '.join(sorted(SUPPORTED_RUNTIMES))}")
    return value


def read_handler(value: Any, runtime: str, fail: Fail) -> str:
    """``Handler`` (``""`` when absent): every runtime but the OS-only ones needs one."""
    if value == "":
        if not runtime.startswith("provided"):
            fail(f"Handler is missing; runtime {runtime} needs one")
        return ""
    if not isinstance(value, str):
        fail(f"Handler must be a string, not {value!r}")
    return value


def read_whole(fail: Fail, value: Any, prop: str, low: int = 0, high: int | None = None) -> int:
    """A whole-number property (``"5"`` and ``5.0`` too) from ``low`` up, or to ``high``."""
    number = _as_int(value)
    if number is None or number < low or (high is not None and number > high):
        fail(f"{prop} {value!r} must be a whole number from {low}" + (f" to {high}" if high else " up"))
    return number


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def check_layer_count(count: int, fail: Fail) -> None:
    """A function uses at most MAX_LAYERS layers."""
    if count > MAX_LAYERS:
        fail(f"Layers: {count} layers; a function can use at most {MAX_LAYERS}")


def read_environment(value: Any, fail: Fail) -> dict[str, str]:
    """``Environment``'s Variables as the strings Lambda sets, within its name, reserved-name and size rules."""
    variables = value.get("Variables", {}) if isinstance(value, dict) else None
    if not isinstance(variables, dict):
        fail("Environment must be a mapping with a Variables mapping")
    environment: dict[str, str] = {}
    for key, raw in variables.items():
        if key in RESERVED_ENVIRONMENT_VARIABLES:  # (before the name rule, which _HANDLER breaks too)
            fail(f"Environment variable {key} is reserved by Lambda and cannot be set")
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            fail(f"Environment variable {key!r}: {_ENV_KEY_RULE}")
        if raw is None:
            fail(f"Environment variable {key} has no value")
        try:
            environment[key] = scalar_text(raw, f"Environment variable {key}")
        except Unresolvable as exc:
            fail(exc.rule)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in environment.items())
    if size > MAX_ENVIRONMENT_BYTES:
        fail(f"Environment variables take {size} bytes; Lambda allows at most {MAX_ENVIRONMENT_BYTES}")
    return environment
