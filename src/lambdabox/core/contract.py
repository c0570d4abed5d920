"""Lambda's fixed rules that several layers check: the reserved environment variables (refused in a template, set
only by Lambda in an environment) and the runtimes lambdabox runs (any other refused in a template and by the
sandbox).
"""

from __future__ import annotations

from typing import Final

# The AWS Lambda Developer Guide, "Working with Lambda environment variables", "Defined runtime environment
# variables" (https://docs.aws.amazon.com/lambda/latest/dg/configuration-envvars.html#configuration-envvars-runtime):
# "The keys for these environment variables are reserved and cannot be set in your function configuration."
# _X_AMZN_TRACE_ID "changes with each invocation": the runtime sets it per invoke, nothing sets it at start.
# TZ, reserved in earlier versions of the guide, is now among its unreserved variables.
RESERVED_ENVIRONMENT_VARIABLES: Final = frozenset(
    {
        "_HANDLER",
        "_X_AMZN_TRACE_ID",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
    }
)
"""Variables only Lambda sets: a template that sets one is refused; any other value for one is ignored."""

PYTHON_RUNTIMES: Final = frozenset(f"python3.{minor}" for minor in range(9, 15))
"""Lambda's Python runtime identifiers that lambdabox runs (with awslambdaric, per Python version)."""

NODEJS_RUNTIMES: Final = frozenset(f"nodejs{major}.x" for major in (18, 20, 22, 24))
"""Lambda's Node.js runtime identifiers that lambdabox runs (with aws-lambda-ric)."""

OS_ONLY_RUNTIMES: Final = frozenset({"provided", "provided.al2", "provided.al2023"})
"""The OS-only runtimes (the ``provided`` runtime family): the function's own ``bootstrap`` is the runtime."""

SUPPORTED_RUNTIMES: Final = PYTHON_RUNTIMES | NODEJS_RUNTIMES | OS_ONLY_RUNTIMES
"""Every runtime identifier lambdabox runs; a template naming another is refused before anything starts."""
