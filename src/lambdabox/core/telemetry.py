"""The Logs and Telemetry APIs as data: subscription validation (Lambda's error bodies, ranges and defaults) and the
records each API and schema version sends for an environment event. Pure: no asyncio, sockets or clock; times are
parameters. Batching is in :mod:`lambdabox.core.batching`."""

from __future__ import annotations

import functools
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard
from urllib.parse import urlsplit

from lambdabox.core import jsontext
from lambdabox.core.errors import ApiError, ErrorType

LOGS = "logs"
TELEMETRY = "telemetry"
CATEGORIES = ("platform", "function", "extension")
LOGS_SCHEMAS = ("2020-08-15", "2021-03-18")  # the second adds platform.runtimeDone
TELEMETRY_SCHEMAS = ("2022-07-01", "2022-12-13", "2025-01-29")
API_NAMES = {LOGS: "Logs", TELEMETRY: "Telemetry"}
ERROR_TYPE = {LOGS: ErrorType.LOGS_VALIDATION, TELEMETRY: ErrorType.TELEMETRY_VALIDATION}
CLOSED = {
    LOGS: (ErrorType.LOGS_SUBSCRIPTION_CLOSED, "Logs API subscription is closed already"),
    TELEMETRY: (ErrorType.TELEMETRY_SUBSCRIPTION_CLOSED, "Telemetry API subscription is closed already"),
}
SUBSCRIPTION_TYPE = {LOGS: "platform.logsSubscription", TELEMETRY: "platform.telemetrySubscription"}
DROPPED_REASON = "Consumer seems to have fallen behind as it has not acknowledged receipt of logs."
BUFFERING_BOUNDS = {  # name: (minimum, maximum, default)
    "maxItems": (1_000, 10_000, 10_000),
    "maxBytes": (262_144, 1_048_576, 262_144),
    "timeoutMs": (25, 30_000, 1_000),
}
SANDBOX_HOSTS = ("sandbox", "sandbox.localdomain", "localhost")


# ---- subscriptions ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buffering:
    max_items: int = 10_000
    max_bytes: int = 262_144
    timeout_ms: int = 1_000


@dataclass(frozen=True)
class Destination:
    """Where a subscriber listens: ``HTTP`` (``host``/``port``/``path`` from its URI) or ``TCP`` (a port)."""

    protocol: str
    port: int
    host: str = "sandbox"
    path: str = "/"

    @property
    def connect_host(self) -> str:
        """The address to dial: sandbox names are loopback inside the environment, with or without /etc/hosts."""
        return "127.0.0.1" if self.host in SANDBOX_HOSTS else self.host


@dataclass(frozen=True)
class Subscription:
    api: str
    schema_version: str
    types: tuple[str, ...]
    destination: Destination
    buffering: Buffering


def parse_logs_subscription(body: object) -> Subscription:
    """A ``PUT /2020-08-15/logs`` body, or ApiError 400 ``Logs.ValidationError`` naming every problem."""
    return parse(LOGS, body)


def parse_telemetry_subscription(body: object) -> Subscription:
    """A ``PUT /2022-07-01/telemetry`` body, or ApiError 400 ``ValidationError`` naming every problem."""
    return parse(TELEMETRY, body)


def parse(api: str, body: object) -> Subscription:
    """A subscription body of ``api`` (LOGS or TELEMETRY), or ApiError 400 with that API's error type."""
    if not isinstance(body, dict):
        raise ApiError(400, ERROR_TYPE[api], "request body must be a JSON object")
    problems: list[str] = []
    schema = _schema_version(body.get("schemaVersion"), api, problems)
    types = _types(body.get("types"), problems)
    destination = _destination(body.get("destination"), problems)
    buffering = _buffering(body.get("buffering", {}), problems)
    if problems or destination is None:
        raise ApiError(400, ERROR_TYPE[api], "; ".join(problems))
    return Subscription(api, schema, types, destination, buffering)


def _schema_version(value: object, api: str, problems: list[str]) -> str:
    allowed = LOGS_SCHEMAS if api == LOGS else TELEMETRY_SCHEMAS
    if value is None and api == LOGS:
        return LOGS_SCHEMAS[0]
    if value not in allowed:
        problems.append(f"schemaVersion must be one of {', '.join(allowed)}")
        return allowed[0]
    return str(value)


def _types(value: object, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.append("types should not be empty")
        return ()
    unknown = [t for t in value if t not in CATEGORIES]
    if unknown:
        problems.append(f"types may only contain platform, function and extension, not {unknown!r}")
    return tuple(dict.fromkeys(t for t in value if t in CATEGORIES))  # duplicates collapse, order kept


def _destination(value: object, problems: list[str]) -> Destination | None:
    if not isinstance(value, dict):
        problems.append('destination is required: {"protocol": "HTTP", "URI": ...} or {"protocol": "TCP", "port": N}')
        return None
    protocol = value.get("protocol")
    if protocol == "TCP":
        port = value.get("port")
        if not _is_int(port) or not 0 < port < 65_536:
            problems.append("destination port must be an integer from 1 to 65535")
            return None
        return Destination("TCP", int(port))
    if protocol != "HTTP":
        problems.append('destination protocol must be "HTTP" or "TCP"')
        return None
    uri = value.get("URI")
    if not isinstance(uri, str) or not uri:
        problems.append("destination URI is required for the HTTP protocol")
        return None
    return _http_destination(uri, problems)


def _http_destination(uri: str, problems: list[str]) -> Destination | None:
    parts = urlsplit(uri)
    if parts.scheme != "http":
        problems.append(f"destination URI must start with http:// (HTTPS is not supported): {uri!r}")
        return None
    host = parts.hostname or ""
    if not _inside_environment(host):
        problems.append(f"destination URI host must be sandbox.localdomain, sandbox or loopback, not {host!r}")
        return None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        problems.append("URI port is not provided")
        return None
    if not 0 < port < 65_536:
        problems.append("URI port must be from 1 to 65535")
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Destination("HTTP", port, host, path)


def _inside_environment(host: str) -> bool:
    if host in SANDBOX_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _buffering(value: object, problems: list[str]) -> Buffering:
    if not isinstance(value, dict):
        problems.append("buffering must be an object with maxItems, maxBytes and/or timeoutMs")
        return Buffering()
    chosen: dict[str, int] = {}
    for name, (low, high, default) in BUFFERING_BOUNDS.items():
        raw = value.get(name, default)
        if not _is_int(raw) or not low <= raw <= high:
            problems.append(f"buffering {name} must be an integer from {low} to {high}, not {raw!r}")
            raw = default
        chosen[name] = int(raw)
    return Buffering(chosen["maxItems"], chosen["maxBytes"], chosen["timeoutMs"])


def _is_int(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def subscription_record(api: str, name: str, types: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The ``platform.logsSubscription`` or ``platform.telemetrySubscription`` record for a new subscription."""
    return SUBSCRIPTION_TYPE[api], {"name": name, "state": "Subscribed", "types": list(types)}


def dropped_record(records: int, nbytes: int) -> dict[str, Any]:
    return {"reason": DROPPED_REASON, "droppedRecords": records, "droppedBytes": nbytes}


# ---- records ------------------------------------------------------------------------------------------------------


class EventLike(Protocol):
    """What the environment emits (``report.TelemetryEvent``): epoch seconds, a type, and the record."""

    @property
    def time(self) -> float: ...
    @property
    def type(self) -> str: ...
    @property
    def record(self) -> Any: ...


def category(type_: str) -> str:
    """``platform``, ``function`` or ``extension``: what a subscription's ``types`` select on."""
    return "platform" if type_.startswith("platform.") else type_


@functools.lru_cache(maxsize=8)  # records come in bursts within a second; thread-safe, as lambdabox.testing needs
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_time(epoch: float) -> str:
    """``2022-10-12T00:00:15.064Z``: ISO-8601, UTC, milliseconds."""
    second, ms = divmod(round(epoch * 1000), 1000)
    return f"{_second(second)}.{ms:03d}Z"


# Fields that came with a later Telemetry schema version, removed for subscribers of an earlier one.
_NEWER_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "2022-07-01": {
        "platform.initStart": ("functionName", "functionVersion", "instanceId", "instanceMaxMemory"),
        "platform.initRuntimeDone": ("errorType",),
        "platform.initReport": ("status", "errorType"),
        "platform.runtimeDone": ("errorType",),
        "platform.report": ("errorType",),
        "platform.extension": ("errorType",),
    },
    "2022-12-13": {"platform.initStart": ("instanceId", "instanceMaxMemory")},
}
_NOT_TELEMETRY = frozenset({"platform.end", "platform.fault", "platform.logsSubscription"})
_LOGS_PASS = frozenset({"platform.fault", "platform.logsSubscription", "platform.logsDropped"})
_LOGS_METRICS = ("durationMs", "billedDurationMs", "memorySizeMB", "maxMemoryUsedMB", "initDurationMs")


def render(api: str, schema_version: str, event: EventLike, *, json_logs: bool = False) -> list[dict[str, Any]]:
    """The records a subscriber of ``api``/``schema_version`` gets for one event: none, one, or (Logs API
    ``platform.report``) two, since the Logs API sends ``platform.end`` where the Telemetry API has none."""
    type_, record = event.type, event.record
    if type_ == "function" and json_logs and isinstance(record, str) and record.startswith("{"):
        record = _json_object(record)
    stamp = iso_time(event.time)
    if api == TELEMETRY:
        shaped = _telemetry_record(schema_version, type_, record)
    else:
        if type_ == "platform.report" and isinstance(record, dict):
            end = {"time": stamp, "type": "platform.end", "record": {"requestId": record.get("requestId")}}
            return [end, {"time": stamp, "type": type_, "record": _logs_report(record)}]
        shaped = _logs_record(schema_version, type_, record)
    return [] if shaped is None else [{"time": stamp, "type": type_, "record": shaped}]


_LINE_TYPES = frozenset({"function", "extension"})


def line_bytes(event: EventLike, *, json_logs: bool = False) -> bytes | None:
    """The wire bytes of a log line (a ``function`` or ``extension`` event with a text record), which every API and
    schema version sends alike: ``encode(render(...)[0])`` for any subscriber, made once and shared. None for any
    other event, and for a JSON function line under ``json_logs`` (whose record is parsed): render and encode those.
    """
    type_, record = event.type, event.record
    if type(record) is not str or type_ not in _LINE_TYPES or (json_logs and type_ == "function" and record[:1] == "{"):
        return None
    text = f'{{"time":"{iso_time(event.time)}","type":"{type_}","record":{_STRING(record)}}}'
    return text.encode("utf-8", "replace")


def _json_object(line: str) -> Any:
    try:
        value = jsontext.loads(line)
    except ValueError:
        return line
    return value if isinstance(value, dict) else line


def _telemetry_record(schema_version: str, type_: str, record: Any) -> Any:
    if type_ in _NOT_TELEMETRY:
        return None
    drop = _NEWER_FIELDS.get(schema_version, {}).get(type_)
    if drop and isinstance(record, dict):
        return {k: v for k, v in record.items() if k not in drop}
    return record


def _logs_record(schema_version: str, type_: str, record: Any) -> Any:
    if type_ in ("function", "extension") or type_ in _LOGS_PASS:
        return record
    if not isinstance(record, dict):
        return None
    if type_ == "platform.start":
        return {k: record[k] for k in ("requestId", "version") if k in record}
    if type_ == "platform.extension":
        return {k: record[k] for k in ("name", "state", "events") if k in record}
    if type_ == "platform.runtimeDone" and schema_version != LOGS_SCHEMAS[0]:
        status = record.get("status")
        return {"requestId": record.get("requestId"), "status": "failure" if status == "error" else status}
    return None  # initStart, initRuntimeDone, initReport, restore*, telemetrySubscription: Telemetry API only


def _logs_report(record: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = record.get("metrics") or {}
    shaped: dict[str, Any] = {
        "requestId": record.get("requestId"),
        "metrics": {k: metrics[k] for k in _LOGS_METRICS if k in metrics},
    }
    if "tracing" in record:
        shaped["tracing"] = record["tracing"]
    return shaped


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_STRING: Callable[[str], str] = json.encoder.encode_basestring


def encode(event: dict[str, Any]) -> bytes:
    """One record as the bytes that go on the wire (an element of the HTTP array, or one NDJSON line)."""
    record = event["record"]
    if type(record) is str and len(event) == 3:  # a log line: the hot path, about four times faster than dumps
        text = f'{{"time":"{event["time"]}","type":{_STRING(event["type"])},"record":{_STRING(record)}}}'
    else:
        text = _ENCODER.encode(event)
    return text.encode("utf-8", "replace")
