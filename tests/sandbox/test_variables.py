"""Function and extension environment variables as Lambda sets them; log stream names."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.contract import RESERVED_ENVIRONMENT_VARIABLES
from lambdabox.core.model import FunctionConfig
from lambdabox.sandbox.variables import (
    RUNTIME_ONLY,
    execution_environment,
    extension_environment,
    function_environment,
    log_stream_name,
)

CREDS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}
HOST = {
    "PATH": "/home/me/bin:/usr/bin:/usr/local/bin/",
    "HOME": "/home/me",
    "SECRET_OF_THE_HOST": "1",
    "AWS_PROFILE": "prod",
    "AWS_REGION": "eu-west-1",
    "VIRTUAL_ENV": "/work/main/.venv",
    "PYTHONPATH": "/somewhere",
    "HTTPS_PROXY": "http://proxy:3128",
    "NODE_EXTRA_CA_CERTS": "/etc/ssl/certs/ca-certificates.crt",
}


def config(runtime: str = "python3.12", **kw: Any) -> FunctionConfig:
    return FunctionConfig(
        logical_id="Fn",
        function_name="my-fn",
        runtime=runtime,
        handler=kw.pop("handler", "app.handler"),
        code=Path("/code"),
        **kw,
    )


def build(
    cfg: FunctionConfig | None = None,
    *,
    credentials: Mapping[str, str] = CREDS,
    host_env: Mapping[str, str] = HOST,
    **kw: Any,
) -> dict[str, str]:
    return function_environment(
        cfg or config(),
        runtime_api="127.0.0.1:9001",
        task_root="/var/task",
        runtime_dir="/var/runtime",
        initialization_type="on-demand",
        log_stream="2024/01/02/[$LATEST]0123456789abcdef0123456789abcdef",
        credentials=credentials,
        host_env=host_env,
        **kw,
    )


def test_reserved_variables() -> None:
    env = build(config(memory_mb=512, region="eu-central-1", version="7"))
    assert env["_HANDLER"] == "app.handler"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-central-1"
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_python3.12"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "my-fn"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "7"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/my-fn"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"] == "2024/01/02/[$LATEST]0123456789abcdef0123456789abcdef"
    assert env["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9001"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"
    assert env["LAMBDA_RUNTIME_DIR"] == "/var/runtime"
    assert "_X_AMZN_TRACE_ID" not in env  # set per invoke by the runtime, not at start


def test_credentials() -> None:
    env = build()
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY"] == "AKIDEXAMPLE"
    assert env["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert env["AWS_SESSION_TOKEN"] == "token"
    env = build(credentials={"AWS_ACCESS_KEY_ID": "AKID2", "AWS_SECRET_ACCESS_KEY": "s2"})
    assert env["AWS_ACCESS_KEY"] == "AKID2"
    assert "AWS_SESSION_TOKEN" not in env


def test_unreserved_defaults() -> None:
    env = build(opt_root="/opt")
    assert env["LANG"] == "en_US.UTF-8"
    assert env["TZ"] == ":UTC"
    assert env["AWS_XRAY_CONTEXT_MISSING"] == "LOG_ERROR"
    assert env["AWS_XRAY_DAEMON_ADDRESS"] == "169.254.79.129:2000"
    assert env["_AWS_XRAY_DAEMON_ADDRESS"] == "169.254.79.129"
    assert env["_AWS_XRAY_DAEMON_PORT"] == "2000"
    assert env["LD_LIBRARY_PATH"] == (
        "/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib"
    )


def test_path_is_lambdas_then_the_hosts() -> None:
    env = build()
    # Lambda's own, then the host's entries that are not already there (/usr/bin and /usr/local/bin/ are).
    assert env["PATH"] == "/usr/local/bin:/usr/bin/:/bin:/opt/bin:/home/me/bin"
    assert build(base_path="/x/bin:/bin")["PATH"] == "/usr/local/bin:/usr/bin/:/bin:/opt/bin:/x/bin"


def test_path_prefix_and_opt_root() -> None:
    env = build(opt_root="/tmp/env/opt", path_prefix=("/cache/lang/python3.12/bin",))
    assert env["PATH"].split(":")[:5] == [
        "/cache/lang/python3.12/bin",
        "/usr/local/bin",
        "/usr/bin/",
        "/bin",
        "/tmp/env/opt/bin",
    ]
    assert env["LD_LIBRARY_PATH"].endswith(":/tmp/env/opt/lib")


def test_host_environment_is_not_inherited() -> None:
    env = build()
    for name in ("HOME", "SECRET_OF_THE_HOST", "AWS_PROFILE", "VIRTUAL_ENV", "PYTHONPATH"):
        assert name not in env
    assert env["AWS_REGION"] == "us-east-1"  # the function's region, not the host's
    # Network plumbing is the exception (a host behind a proxy or a private CA).
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert env["NODE_EXTRA_CA_CERTS"] == "/etc/ssl/certs/ca-certificates.crt"


def test_only_expected_names() -> None:
    env = build(host_env={"PATH": "/usr/bin"})
    unreserved = {
        "LANG",
        "PATH",
        "LD_LIBRARY_PATH",
        "TZ",
        "AWS_XRAY_CONTEXT_MISSING",
        "AWS_XRAY_DAEMON_ADDRESS",
        "_AWS_XRAY_DAEMON_ADDRESS",
        "_AWS_XRAY_DAEMON_PORT",
    }
    assert set(env) == (RESERVED_ENVIRONMENT_VARIABLES - {"_X_AMZN_TRACE_ID"}) | unreserved


@pytest.mark.parametrize("name", sorted(RESERVED_ENVIRONMENT_VARIABLES))
def test_no_reserved_name_takes_the_functions_value(name: str) -> None:
    # The list the template loader refuses: a config built in code that sets one still gets Lambda's value.
    assert build(config(environment={name: "mine"})).get(name) != "mine"


def test_user_variables_override_unreserved_but_not_reserved() -> None:
    user = {
        "LANG": "C.UTF-8",
        "TZ": "Europe/Paris",
        "PATH": "/mine",
        "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR",
        "HTTPS_PROXY": "",
        "MY_SETTING": "42",
        "AWS_REGION": "ap-south-1",
        "_HANDLER": "evil.handler",
        "AWS_LAMBDA_RUNTIME_API": "10.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "AKIAUSER",
        "AWS_SESSION_TOKEN": "user-token",
        "LAMBDA_TASK_ROOT": "/elsewhere",
        "_X_AMZN_TRACE_ID": "Root=1-user",
    }
    env = build(config(environment=user), credentials={"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "S"})
    assert env["LANG"] == "C.UTF-8"
    assert env["TZ"] == "Europe/Paris"
    assert env["PATH"] == "/mine"
    assert env["AWS_XRAY_CONTEXT_MISSING"] == "IGNORE_ERROR"
    assert env["HTTPS_PROXY"] == ""
    assert env["MY_SETTING"] == "42"
    assert env["AWS_REGION"] == "us-east-1"
    assert env["_HANDLER"] == "app.handler"
    assert env["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9001"
    assert env["AWS_ACCESS_KEY_ID"] == "AK"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"
    # Reserved names Lambda did not set this time are still not the user's to set.
    assert "AWS_SESSION_TOKEN" not in env
    assert "_X_AMZN_TRACE_ID" not in env


def test_runtime_env_layering() -> None:
    runtime_env = {
        "PYTHONPATH": "/var/task:/opt/python:/var/runtime",
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
    }
    env = build(runtime_env=runtime_env)
    assert env["PYTHONPATH"] == "/var/task:/opt/python:/var/runtime"
    user = {"PYTHONPATH": "/var/task/vendor", "AWS_EXECUTION_ENV": "mine"}
    env = build(config(environment=user), runtime_env=runtime_env)
    assert env["PYTHONPATH"] == "/var/task/vendor"  # unreserved: the function's value wins
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_python3.12"  # reserved


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        ("python3.12", "AWS_Lambda_python3.12"),
        ("python3.9", "AWS_Lambda_python3.9"),
        ("nodejs20.x", "AWS_Lambda_nodejs20.x"),
        ("provided", None),
        ("provided.al2", None),
        ("provided.al2023", None),
    ],
)
def test_execution_env(runtime: str, expected: str | None) -> None:
    assert execution_environment(runtime) == expected
    env = build(config(runtime, handler=""))
    assert env.get("AWS_EXECUTION_ENV") == expected
    assert env["_HANDLER"] == ""


def test_extension_environment_drops_runtime_only_variables() -> None:
    env = build(config(environment={"MY_SETTING": "42"}), runtime_env={"PYTHONPATH": "/p"})
    ext = extension_environment(env)
    assert set(env) - set(ext) == RUNTIME_ONLY
    for name in ("AWS_EXECUTION_ENV", "_HANDLER", "LAMBDA_TASK_ROOT", "AWS_XRAY_DAEMON_ADDRESS"):
        assert name not in ext
    for name in ("MY_SETTING", "AWS_REGION", "AWS_LAMBDA_RUNTIME_API", "AWS_ACCESS_KEY_ID", "PATH", "PYTHONPATH"):
        assert ext[name] == env[name]
    assert env["_HANDLER"] == "app.handler"  # the function's mapping is left alone


def test_log_stream_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # a zone where 23:30 UTC is already the next day
    time.tzset()
    name = log_stream_name("$LATEST", 1_700_000_000.5)  # 2023-11-14T22:13:20Z
    assert re.fullmatch(r"2023/11/14/\[\$LATEST\][0-9a-f]{32}", name)
    assert log_stream_name("3", 0).startswith("1970/01/01/[3]")
    # UTC: 23:30 on Dec 31st is still Dec 31st, whatever the machine's zone.
    assert log_stream_name("1", 1_704_065_400).startswith("2023/12/31/[1]")
    assert log_stream_name("$LATEST", 0) != log_stream_name("$LATEST", 0)


@pytest.fixture(autouse=True)
def _restore_timezone() -> Iterator[None]:
    yield
    time.tzset()  # after monkeypatch has put TZ back
