"""Test Lambda functions and extensions from plain synchronous tests; the pytest plugin's library.

Build a function (:func:`function_from_code`, :func:`function_from_template`), invoke it, read every event its
environment produced, wait with deadlines (never sleeps), and assert with messages that show what was seen.
"""

from lambdabox.testing.assertion import assert_event_order, assert_invoke_failed, assert_invoked_ok
from lambdabox.testing.build import PYTHON_RUNTIME, function_from_code, function_from_template
from lambdabox.testing.events import EXTENSION_STATES, ExtensionEvent, Invocation
from lambdabox.testing.function import LambdaFunction, PendingInvocation, WaitTimedOut

__all__ = [
    "EXTENSION_STATES",
    "PYTHON_RUNTIME",
    "ExtensionEvent",
    "Invocation",
    "LambdaFunction",
    "PendingInvocation",
    "WaitTimedOut",
    "assert_event_order",
    "assert_invoke_failed",
    "assert_invoked_ok",
    "function_from_code",
    "function_from_template",
]
