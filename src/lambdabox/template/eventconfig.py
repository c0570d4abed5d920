"""Reads how Lambda handles a function's asynchronous invokes from a template: SAM's ``EventInvokeConfig`` property
or CloudFormation's ``AWS::Lambda::EventInvokeConfig`` (retries, maximum event age, OnSuccess/OnFailure).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn

from lambdabox.core.model import DEFAULT_ACCOUNT_ID, DEFAULT_REGION, EventInvokeConfig

EVENT_INVOKE_CONFIG: Final = "AWS::Lambda::EventInvokeConfig"
RETRY_ATTEMPTS_RANGE: Final = (0, 2)
EVENT_AGE_RANGE: Final = (60, 21600)
STAND_IN_ARNS: Final = {  # destinations that are resources of the template: lambdabox writes their records to a file
    "AWS::SQS::Queue": f"arn:aws:sqs:{DEFAULT_REGION}:{DEFAULT_ACCOUNT_ID}:{{}}",
    "AWS::SNS::Topic": f"arn:aws:sns:{DEFAULT_REGION}:{DEFAULT_ACCOUNT_ID}:{{}}",
    "AWS::Events::EventBus": f"arn:aws:events:{DEFAULT_REGION}:{DEFAULT_ACCOUNT_ID}:event-bus/{{}}",
    "AWS::S3::Bucket": "arn:aws:s3:::{}",
}

Resolve = Callable[[str, Any], Any]
"""(property path, value as written) -> the resolved value; raises TemplateError when it cannot."""
Fail = Callable[[str], NoReturn]


def read_event_invoke(
    owner: str, value: Mapping[str, Any], resources: Mapping[str, Any], resolve: Resolve, fail: Fail, where: str = ""
) -> EventInvokeConfig:
    """The settings in ``value`` (of resource ``owner``), Lambda's defaults for the rest; ``where`` prefixes
    property names in messages."""
    numbers = {"MaximumRetryAttempts": RETRY_ATTEMPTS_RANGE, "MaximumEventAgeInSeconds": EVENT_AGE_RANGE}
    found = {
        key: _count(resolve(key, value[key]), where + key, limits, fail)
        for key, limits in numbers.items()
        if key in value
    }
    destinations = value.get("DestinationConfig")
    destinations = {} if destinations is None else destinations
    if not isinstance(destinations, dict):
        fail(f"{where}DestinationConfig must be a mapping")
    targets: dict[str, str | None] = {}
    for key in ("OnSuccess", "OnFailure"):
        entry = destinations.get(key)
        if entry is not None and not isinstance(entry, dict):
            fail(f"{where}DestinationConfig.{key} must be a mapping with a Destination")
        prop = f"DestinationConfig.{key}"
        targets[key] = None if entry is None else _destination(owner, entry, prop, resources, resolve, fail)
    defaults = EventInvokeConfig()
    return EventInvokeConfig(
        maximum_retry_attempts=found.get("MaximumRetryAttempts", defaults.maximum_retry_attempts),
        maximum_event_age_s=found.get("MaximumEventAgeInSeconds", defaults.maximum_event_age_s),
        on_success=targets["OnSuccess"],
        on_failure=targets["OnFailure"],
    )


def _destination(
    owner: str, entry: dict[str, Any], prop: str, resources: Mapping[str, Any], resolve: Resolve, fail: Fail
) -> str:
    """A destination's ARN or function name. A queue, topic, bus or bucket of the template gets a stand-in ARN (named
    after its logical id), as does the queue or topic SAM creates when an SQS or SNS destination names none."""
    raw = entry.get("Destination")
    if raw is None:
        kind = entry.get("Type")
        if kind not in ("SQS", "SNS"):
            fail(f"{prop}.Destination is missing (only SQS and SNS destinations may leave it out)")
        suffix = "Queue" if kind == "SQS" else "Topic"
        name = f"{owner}EventInvokeConfig{prop.rsplit('.', 1)[-1]}{suffix}"  # as SAM names what it creates
        return STAND_IN_ARNS[f"AWS::{kind}::{suffix}"].format(name)
    if isinstance(raw, dict) and len(raw) == 1:
        getatt = raw.get("Fn::GetAtt")
        ref = raw.get("Ref") or (getatt[0] if isinstance(getatt, list) and getatt else None)
        target = resources.get(ref) if isinstance(ref, str) else None
        kind = target.get("Type") if isinstance(target, dict) else None
        if isinstance(kind, str) and kind in STAND_IN_ARNS:
            return STAND_IN_ARNS[kind].format(ref)
    value = resolve(f"{prop}.Destination", raw)
    if not isinstance(value, str) or not value:
        fail(f"{prop}.Destination must be an ARN or a function name, not {value!r}")
    return value


def _count(value: Any, prop: str, limits: tuple[int, int], fail: Fail) -> int:
    number = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    low, high = limits
    if number is None or not low <= number <= high:
        fail(f"{prop} {value!r} must be a whole number from {low} to {high}")
    return number
