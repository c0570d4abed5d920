"""The Logs and Telemetry APIs as data: subscription validation (every error, default and bound) and the records
each API and schema version sends. No event loop, no clock."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdabox.core.errors import ApiError
from lambdabox.core.telemetry import (
    DROPPED_REASON,
    LOGS,
    LOGS_SCHEMAS,
    TELEMETRY,
    TELEMETRY_SCHEMAS,
    Buffering,
    Destination,
    category,
    dropped_record,
    encode,
    iso_time,
    line_bytes,
    parse_logs_subscription,
    parse_telemetry_subscription,
    render,
    subscription_record,
)

T0 = 1_700_000_000.0
HTTP = {"protocol": "HTTP", "URI": "http://sandbox.localdomain:8080/lambda_logs"}


def telemetry_body(**overrides: Any) -> dict[str, Any]:
    return {"schemaVersion": "2022-12-13", "types": ["platform", "function"], "destination": HTTP, **overrides}


def logs_body(**overrides: Any) -> dict[str, Any]:
    return {"types": ["platform", "function"], "destination": HTTP, **overrides}


def refused(body: object, api: str = TELEMETRY) -> ApiError:
    parse = parse_telemetry_subscription if api == TELEMETRY else parse_logs_subscription
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    assert caught.value.error_type == ("ValidationError" if api == TELEMETRY else "Logs.ValidationError")
    return caught.value


# ---- subscriptions ------------------------------------------------------------------------------------------------


def test_a_telemetry_subscription_with_every_default() -> None:
    subscription = parse_telemetry_subscription(telemetry_body())
    assert subscription.api == TELEMETRY
    assert subscription.schema_version == "2022-12-13"
    assert subscription.types == ("platform", "function")
    assert subscription.buffering == Buffering(max_items=10_000, max_bytes=262_144, timeout_ms=1_000)
    assert subscription.destination == Destination("HTTP", 8080, "sandbox.localdomain", "/lambda_logs")
    assert subscription.destination.connect_host == "127.0.0.1"


def test_a_logs_subscription_defaults_to_schema_2020_08_15() -> None:
    assert parse_logs_subscription(logs_body()).schema_version == "2020-08-15"
    assert parse_logs_subscription(logs_body(schemaVersion="2021-03-18")).schema_version == "2021-03-18"
    assert parse_logs_subscription(logs_body()).api == LOGS


@pytest.mark.parametrize("version", ["2022-07-01", "2022-12-13", "2025-01-29"])
def test_every_telemetry_schema_version_is_accepted(version: str) -> None:
    assert parse_telemetry_subscription(telemetry_body(schemaVersion=version)).schema_version == version


@pytest.mark.parametrize(
    ("api", "version"), [(TELEMETRY, None), (TELEMETRY, "2020-08-15"), (TELEMETRY, 20220701), (LOGS, "2022-07-01")]
)
def test_a_schema_version_the_api_does_not_have_is_refused(api: str, version: object) -> None:
    body = telemetry_body(schemaVersion=version) if api == TELEMETRY else logs_body(schemaVersion=version)
    if version is None:
        del body["schemaVersion"]
    assert "schemaVersion must be one of" in refused(body, api).message


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_a_body_that_is_not_an_object_is_refused(body: object) -> None:
    assert refused(body).message == "request body must be a JSON object"
    assert refused(body, LOGS).message == "request body must be a JSON object"


@pytest.mark.parametrize("types", [None, [], "platform", {"platform": True}])
def test_types_must_be_a_non_empty_list(types: object) -> None:
    assert refused(telemetry_body(types=types)).message == "types should not be empty"


def test_types_are_a_subset_of_platform_function_extension() -> None:
    assert "not ['metrics']" in refused(telemetry_body(types=["platform", "metrics"])).message
    every = parse_telemetry_subscription(telemetry_body(types=["extension", "function", "platform", "function"]))
    assert every.types == ("extension", "function", "platform")


@pytest.mark.parametrize(
    ("destination", "problem"),
    [
        (None, "destination is required"),
        ("http://sandbox:8080", "destination is required"),
        ({"protocol": "UDP", "port": 9}, 'destination protocol must be "HTTP" or "TCP"'),
        ({"protocol": "http", "URI": "http://sandbox:8080"}, 'destination protocol must be "HTTP" or "TCP"'),
        ({"protocol": "HTTP"}, "destination URI is required"),
        ({"protocol": "HTTP", "URI": ""}, "destination URI is required"),
        ({"protocol": "HTTP", "URI": "https://sandbox.localdomain:8080"}, "HTTPS is not supported"),
        ({"protocol": "HTTP", "URI": "sandbox.localdomain:8080"}, "must start with http://"),
        ({"protocol": "HTTP", "URI": "http://example.com:8080"}, "host must be sandbox.localdomain"),
        ({"protocol": "HTTP", "URI": "http://10.0.0.1:8080"}, "host must be sandbox.localdomain"),
        ({"protocol": "HTTP", "URI": "http://sandbox.localdomain/logs"}, "URI port is not provided"),
        ({"protocol": "HTTP", "URI": "http://sandbox:0"}, "URI port must be from 1 to 65535"),
        ({"protocol": "HTTP", "URI": "http://sandbox:99999"}, "URI port must be from 1 to 65535"),
        ({"protocol": "TCP"}, "destination port must be an integer from 1 to 65535"),
        ({"protocol": "TCP", "port": 0}, "destination port must be an integer from 1 to 65535"),
        ({"protocol": "TCP", "port": 65536}, "destination port must be an integer from 1 to 65535"),
        ({"protocol": "TCP", "port": "8080"}, "destination port must be an integer from 1 to 65535"),
        ({"protocol": "TCP", "port": True}, "destination port must be an integer from 1 to 65535"),
    ],
)
def test_a_destination_outside_the_rules_is_refused(destination: object, problem: str) -> None:
    assert problem in refused(telemetry_body(destination=destination)).message
    assert problem in refused(logs_body(destination=destination), LOGS).message


@pytest.mark.parametrize(
    ("uri", "host", "connect", "path"),
    [
        ("http://sandbox:4243", "sandbox", "127.0.0.1", "/"),
        ("http://sandbox.localdomain:4243/a/b?x=1", "sandbox.localdomain", "127.0.0.1", "/a/b?x=1"),
        ("http://localhost:4243/", "localhost", "127.0.0.1", "/"),
        ("http://127.0.0.1:4243/t", "127.0.0.1", "127.0.0.1", "/t"),
        ("http://127.1.2.3:4243", "127.1.2.3", "127.1.2.3", "/"),
        ("http://[::1]:4243", "::1", "::1", "/"),
    ],
)
def test_destinations_inside_the_environment(uri: str, host: str, connect: str, path: str) -> None:
    destination = parse_telemetry_subscription(telemetry_body(destination={"protocol": "HTTP", "URI": uri}))
    assert destination.destination == Destination("HTTP", 4243, host, path)
    assert destination.destination.connect_host == connect


def test_a_tcp_destination_is_a_port_on_the_sandbox() -> None:
    destination = parse_logs_subscription(logs_body(destination={"protocol": "TCP", "port": 4244})).destination
    assert destination == Destination("TCP", 4244)
    assert destination.connect_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("name", "low", "high"), [("maxItems", 1_000, 10_000), ("maxBytes", 262_144, 1_048_576), ("timeoutMs", 25, 30_000)]
)
def test_every_buffering_bound_is_inclusive_and_enforced(name: str, low: int, high: int) -> None:
    field = {"maxItems": "max_items", "maxBytes": "max_bytes", "timeoutMs": "timeout_ms"}[name]
    for good in (low, high, float(low)):
        buffering = parse_telemetry_subscription(telemetry_body(buffering={name: good})).buffering
        assert getattr(buffering, field) == good
        assert isinstance(getattr(buffering, field), int)
    for bad in (low - 1, high + 1, "100", True, low + 0.5, None):
        message = refused(telemetry_body(buffering={name: bad})).message
        assert message == f"buffering {name} must be an integer from {low} to {high}, not {bad!r}"


def test_partial_buffering_keeps_the_other_defaults() -> None:
    buffering = parse_logs_subscription(logs_body(buffering={"timeoutMs": 25})).buffering
    assert buffering == Buffering(max_items=10_000, max_bytes=262_144, timeout_ms=25)


@pytest.mark.parametrize("buffering", [None, [], 100])
def test_buffering_must_be_an_object(buffering: object) -> None:
    assert "buffering must be an object" in refused(telemetry_body(buffering=buffering)).message


def test_every_problem_is_named_in_one_message() -> None:
    body = {"types": [], "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain"}}
    assert refused(body, LOGS).message == "types should not be empty; URI port is not provided"


def test_subscription_and_dropped_records() -> None:
    assert subscription_record(LOGS, "ext", ("platform",)) == (
        "platform.logsSubscription",
        {"name": "ext", "state": "Subscribed", "types": ["platform"]},
    )
    assert subscription_record(TELEMETRY, "ext", ("function",))[0] == "platform.telemetrySubscription"
    assert dropped_record(3, 120) == {"reason": DROPPED_REASON, "droppedRecords": 3, "droppedBytes": 120}


# ---- records ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    time: float
    type: str
    record: Any


START = {"requestId": "r1", "version": "$LATEST", "tracing": {"type": "X-Amzn-Trace-Id", "value": "Root=1"}}
RUNTIME_DONE = {"requestId": "r1", "status": "error", "errorType": "Function.Unhandled", "metrics": {"durationMs": 2.5}}
METRICS = {"durationMs": 2.5, "billedDurationMs": 3, "memorySizeMB": 128, "maxMemoryUsedMB": 40, "initDurationMs": 9.0}
REPORT = {"requestId": "r1", "status": "error", "errorType": "Function.Unhandled", "metrics": METRICS}
INIT_START = {
    "initializationType": "on-demand",
    "phase": "init",
    "functionName": "Fn",
    "functionVersion": "$LATEST",
    "instanceId": "i-1",
    "instanceMaxMemory": 1024,
}
INIT_REPORT = {"initializationType": "on-demand", "phase": "init", "status": "error", "errorType": "Runtime.Crash"}


def shaped(api: str, schema: str, type_: str, record: Any, *, json_logs: bool = False) -> list[dict[str, Any]]:
    return render(api, schema, Event(T0 + 0.064, type_, record), json_logs=json_logs)


def test_times_are_iso_8601_utc_with_milliseconds() -> None:
    assert iso_time(T0) == "2023-11-14T22:13:20.000Z"
    assert iso_time(T0 + 0.064) == "2023-11-14T22:13:20.064Z"
    assert iso_time(T0 + 0.9996) == "2023-11-14T22:13:21.000Z"
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"


def test_categories() -> None:
    assert [category(t) for t in ("platform.start", "function", "extension")] == ["platform", "function", "extension"]


def test_a_log_line_is_a_string_record_in_both_apis() -> None:
    for api, schema in ((TELEMETRY, "2022-07-01"), (LOGS, "2020-08-15")):
        assert shaped(api, schema, "function", "hello\n") == [
            {"time": "2023-11-14T22:13:20.064Z", "type": "function", "record": "hello\n"}
        ]
        assert shaped(api, schema, "extension", '{"a": 1}', json_logs=True)[0]["record"] == '{"a": 1}'


def test_json_log_format_makes_json_object_lines_object_records() -> None:
    line = '{"timestamp": "t", "level": "INFO", "message": "hi"}'
    for api in (TELEMETRY, LOGS):
        schema = "2025-01-29" if api == TELEMETRY else "2021-03-18"
        assert shaped(api, schema, "function", line, json_logs=True)[0]["record"] == json.loads(line)
        assert shaped(api, schema, "function", line)[0]["record"] == line
        for other in ("[1, 2]", "{not json", "plain text"):
            assert shaped(api, schema, "function", other, json_logs=True)[0]["record"] == other


def test_telemetry_2025_01_29_sends_every_field() -> None:
    for type_, record in (
        ("platform.initStart", INIT_START),
        ("platform.initReport", INIT_REPORT),
        ("platform.start", START),
        ("platform.runtimeDone", RUNTIME_DONE),
        ("platform.report", REPORT),
    ):
        assert shaped(TELEMETRY, "2025-01-29", type_, record) == [
            {"time": "2023-11-14T22:13:20.064Z", "type": type_, "record": record}
        ]


def test_telemetry_2022_12_13_has_no_managed_instance_fields() -> None:
    (event,) = shaped(TELEMETRY, "2022-12-13", "platform.initStart", INIT_START)
    assert event["record"] == {k: v for k, v in INIT_START.items() if k not in ("instanceId", "instanceMaxMemory")}
    assert shaped(TELEMETRY, "2022-12-13", "platform.report", REPORT)[0]["record"] == REPORT


def test_telemetry_2022_07_01_has_neither_status_nor_error_type_where_it_came_later() -> None:
    def record(type_: str, value: dict[str, Any]) -> Any:
        return shaped(TELEMETRY, "2022-07-01", type_, value)[0]["record"]

    assert record("platform.initStart", INIT_START) == {"initializationType": "on-demand", "phase": "init"}
    assert record("platform.initReport", INIT_REPORT) == {"initializationType": "on-demand", "phase": "init"}
    assert record("platform.runtimeDone", RUNTIME_DONE) == {k: v for k, v in RUNTIME_DONE.items() if k != "errorType"}
    assert record("platform.report", REPORT) == {"requestId": "r1", "status": "error", "metrics": METRICS}
    assert record("platform.start", START) == START
    assert INIT_START["instanceId"] == "i-1"  # the event's own record is never changed


@pytest.mark.parametrize("type_", ["platform.end", "platform.fault", "platform.logsSubscription"])
def test_logs_api_only_types_never_reach_telemetry_subscribers(type_: str) -> None:
    assert shaped(TELEMETRY, "2025-01-29", type_, {"requestId": "r1"}) == []


def test_logs_api_platform_start_is_request_id_and_version() -> None:
    assert shaped(LOGS, "2020-08-15", "platform.start", START)[0]["record"] == {"requestId": "r1", "version": "$LATEST"}


def test_logs_api_report_comes_after_a_platform_end() -> None:
    end, report = shaped(LOGS, "2020-08-15", "platform.report", {**REPORT, "spans": []})
    assert end == {"time": "2023-11-14T22:13:20.064Z", "type": "platform.end", "record": {"requestId": "r1"}}
    assert report == {
        "time": "2023-11-14T22:13:20.064Z",
        "type": "platform.report",
        "record": {"requestId": "r1", "metrics": METRICS},
    }
    warm = {"requestId": "r2", "status": "success", "metrics": {**METRICS, "initDurationMs": None}, "tracing": {"v": 1}}
    del warm["metrics"]["initDurationMs"]
    assert shaped(LOGS, "2021-03-18", "platform.report", warm)[1]["record"] == {
        "requestId": "r2",
        "metrics": {k: v for k, v in METRICS.items() if k != "initDurationMs"},
        "tracing": {"v": 1},
    }


def test_logs_api_runtime_done_only_with_schema_2021_03_18() -> None:
    assert shaped(LOGS, "2020-08-15", "platform.runtimeDone", RUNTIME_DONE) == []
    for status, sent in (("success", "success"), ("error", "failure"), ("failure", "failure"), ("timeout", "timeout")):
        (event,) = shaped(LOGS, "2021-03-18", "platform.runtimeDone", {**RUNTIME_DONE, "status": status})
        assert event["record"] == {"requestId": "r1", "status": sent}


@pytest.mark.parametrize(
    "type_",
    [
        "platform.initStart",
        "platform.initRuntimeDone",
        "platform.initReport",
        "platform.restoreStart",
        "platform.restoreReport",
        "platform.telemetrySubscription",
    ],
)
def test_telemetry_api_only_types_never_reach_logs_subscribers(type_: str) -> None:
    for schema in ("2020-08-15", "2021-03-18"):
        assert shaped(LOGS, schema, type_, INIT_START) == []


def test_logs_api_platform_records_it_shares() -> None:
    extension = {"name": "ext", "state": "Ready", "events": ["INVOKE"], "errorType": "X"}
    assert shaped(LOGS, "2020-08-15", "platform.extension", extension)[0]["record"] == {
        "name": "ext",
        "state": "Ready",
        "events": ["INVOKE"],
    }
    fault = "RequestId: r1 Process exited before completing request"
    assert shaped(LOGS, "2020-08-15", "platform.fault", fault)[0]["record"] == fault
    for type_, record in (("platform.logsSubscription", {"name": "e"}), ("platform.logsDropped", dropped_record(1, 2))):
        assert shaped(LOGS, "2020-08-15", type_, record)[0]["record"] == record


def test_encoding_is_compact_utf8_json() -> None:
    assert (
        encode({"time": "t", "type": "function", "record": "é"})
        == '{"time":"t","type":"function","record":"é"}'.encode()
    )


ALL_SCHEMAS = [(TELEMETRY, s) for s in TELEMETRY_SCHEMAS] + [(LOGS, s) for s in LOGS_SCHEMAS]


@settings(max_examples=200)
@given(
    type_=st.sampled_from(["function", "extension"]),
    text=st.text(),
    json_logs=st.booleans(),
    at=st.floats(min_value=0, max_value=4e9),
)
def test_a_log_lines_shared_bytes_are_what_every_api_and_schema_would_encode(
    type_: str, text: str, json_logs: bool, at: float
) -> None:
    event = Event(at, type_, text)
    shared = line_bytes(event, json_logs=json_logs)
    if json_logs and type_ == "function" and text.startswith("{"):
        assert shared is None  # its record may be parsed: each subscriber's own render
        return
    assert shared is not None
    for api, schema in ALL_SCHEMAS:
        assert [shared] == [encode(r) for r in render(api, schema, event, json_logs=json_logs)]


@pytest.mark.parametrize(
    ("type_", "record"),
    [("platform.start", START), ("platform.fault", "RequestId: r1 Process exited"), ("function", {"a": 1})],
)
def test_anything_but_a_text_log_line_has_no_shared_bytes(type_: str, record: Any) -> None:
    assert line_bytes(Event(T0, type_, record)) is None
