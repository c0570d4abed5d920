"""The environment variables Lambda gives a function's runtime and its extensions (CONTRACT.md §8 and §2),
and the log stream name that goes in them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence

from lambdabox.core.contract import RESERVED_ENVIRONMENT_VARIABLES
from lambdabox.core.model import FunctionConfig

RUNTIME_ONLY = frozenset(
    {
        "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_XRAY_CONTEXT_MISSING",
        "AWS_XRAY_DAEMON_ADDRESS",
        "LAMBDA_RUNTIME_DIR",
        "LAMBDA_TASK_ROOT",
        "_AWS_XRAY_DAEMON_ADDRESS",
        "_AWS_XRAY_DAEMON_PORT",
        "_HANDLER",
    }
)
"""Function variables that extensions do not get."""

CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

LAMBDA_PATH = ("/usr/local/bin", "/usr/bin/", "/bin")  # then <opt>/bin; Lambda's spelling, "/usr/bin/"
XRAY_DAEMON_HOST = "169.254.79.129"
XRAY_DAEMON_PORT = "2000"

# What a function inherits from the host, and why. Everything else on the host (its AWS_* settings,
# HOME, the user's shell variables, lambdabox's own PYTHON* or VIRTUAL_ENV) stays out, as nothing of the
# machine leaks into a Lambda environment.
# * PATH is appended after Lambda's, so that tools the function runs (curl, sh, node, python3) resolve
#   on any host; Lambda's directories still come first.
# * Proxy and CA-bundle variables: without them a function on a host behind a proxy or a private CA
#   cannot reach AWS or anything else. Lambda has no counterpart (its network needs none); they sit under
#   the function's own variables, which may override them.
# HOME is deliberately not passed: Lambda sets none, and with it botocore would read the host's
# ~/.aws/config and credentials instead of the credentials given here.
HOST_NETWORK_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
)


def function_environment(
    config: FunctionConfig,
    *,
    runtime_api: str,
    task_root: str,
    runtime_dir: str,
    initialization_type: str,
    log_stream: str,
    credentials: Mapping[str, str],
    base_path: str | None = None,
    opt_root: str = "/opt",
    runtime_env: Mapping[str, str] | None = None,
    path_prefix: Sequence[str] = (),
    host_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The runtime's environment, layered as Lambda does: unreserved defaults, then the runtime's own
    defaults (``runtime_env``, a RuntimeCommand's ``env``), then the function's Environment.Variables,
    then the reserved variables on top.

    ``base_path`` is the host PATH appended after Lambda's (default: ``host_env``'s PATH);
    ``path_prefix`` goes before it (a RuntimeCommand's ``path_prefix``, Lambda's /var/lang/bin);
    ``opt_root`` is where layers are (/opt, or a host directory without a mount namespace);
    ``credentials`` holds AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN;
    ``host_env`` defaults to ``os.environ``.
    """
    host = os.environ if host_env is None else host_env
    env: dict[str, str] = {name: host[name] for name in HOST_NETWORK_VARIABLES if name in host}
    host_path = host.get("PATH", "") if base_path is None else base_path
    env.update(
        {
            "LANG": "en_US.UTF-8",
            "PATH": _join_path([*path_prefix, *LAMBDA_PATH, f"{opt_root}/bin"], host_path),
            "LD_LIBRARY_PATH": ":".join(
                [
                    "/lib64",
                    "/usr/lib64",
                    runtime_dir,
                    f"{runtime_dir}/lib",
                    task_root,
                    f"{task_root}/lib",
                    f"{opt_root}/lib",
                ]
            ),
            "TZ": ":UTC",
            "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
            "AWS_XRAY_DAEMON_ADDRESS": f"{XRAY_DAEMON_HOST}:{XRAY_DAEMON_PORT}",
            "_AWS_XRAY_DAEMON_ADDRESS": XRAY_DAEMON_HOST,
            "_AWS_XRAY_DAEMON_PORT": XRAY_DAEMON_PORT,
        }
    )
    runtime_env = runtime_env or {}
    env.update({k: v for k, v in runtime_env.items() if k not in RESERVED_ENVIRONMENT_VARIABLES})
    env.update({k: v for k, v in config.environment.items() if k not in RESERVED_ENVIRONMENT_VARIABLES})

    reserved = {
        "_HANDLER": config.handler,
        "AWS_REGION": config.region,
        "AWS_DEFAULT_REGION": config.region,
        "AWS_LAMBDA_FUNCTION_NAME": config.function_name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.memory_mb),
        "AWS_LAMBDA_FUNCTION_VERSION": config.version,
        "AWS_LAMBDA_INITIALIZATION_TYPE": initialization_type,
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{config.function_name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": log_stream,
        "AWS_LAMBDA_RUNTIME_API": runtime_api,
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": runtime_dir,
    }
    execution_env = runtime_env.get("AWS_EXECUTION_ENV") or execution_environment(config.runtime)
    if execution_env:
        reserved["AWS_EXECUTION_ENV"] = execution_env
    for name in CREDENTIAL_VARIABLES:
        if credentials.get(name):
            reserved[name] = credentials[name]
    if "AWS_ACCESS_KEY_ID" in reserved:
        reserved["AWS_ACCESS_KEY"] = reserved["AWS_ACCESS_KEY_ID"]
    env.update(reserved)
    return env


def execution_environment(runtime: str) -> str | None:
    """AWS_EXECUTION_ENV for a managed runtime (``AWS_Lambda_python3.12``); None for OS-only runtimes."""
    if not runtime or runtime.startswith("provided"):
        return None
    return f"AWS_Lambda_{runtime}"


def extension_environment(function_env: Mapping[str, str]) -> dict[str, str]:
    """What external extensions get: the function's variables minus the runtime-only ones."""
    return {k: v for k, v in function_env.items() if k not in RUNTIME_ONLY}


def log_stream_name(version: str, now_epoch_s: float) -> str:
    """``YYYY/MM/DD/[<version>]<32 hex>``, dated in UTC like Lambda's."""
    return f"{time.strftime('%Y/%m/%d', time.gmtime(now_epoch_s))}/[{version}]{uuid.uuid4().hex}"


def _join_path(first: Sequence[str], rest: str) -> str:
    """``first`` then the entries of ``rest`` not already in it (comparing without trailing slashes)."""
    entries: list[str] = []
    seen: set[str] = set()
    for entry in [*first, *rest.split(os.pathsep)]:
        key = entry.rstrip("/") or entry
        if entry and key not in seen:
            seen.add(key)
            entries.append(entry)
    return ":".join(entries)


def host_credentials() -> dict[str, str]:
    """The credentials a function gets: the host's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN where
    set (the AWS SDKs in the function then reach AWS as the developer), else a fixed stand-in pair."""
    found = {name: os.environ[name] for name in CREDENTIAL_VARIABLES if name in os.environ}
    if "AWS_ACCESS_KEY_ID" not in found:
        found = {"AWS_ACCESS_KEY_ID": "AKIALAMBDABOXLOCAL00", "AWS_SECRET_ACCESS_KEY": "lambdabox-local-secret"}
    return found
