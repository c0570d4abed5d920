"""Logs and Telemetry API subscriptions as core facts: the window (Init only), Lambda's 400 and 403 answers, one API
per extension, repeats, and what the lifecycle asks the shell to do around them (keep the Init's records, subscribe,
flush before SHUTDOWN, pause before a freeze). No clock, no sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from core_support import T0, TRACE, of_type, one, platform
from lambdabox.core.errors import ApiError
from lambdabox.core.facts import (
    CloseSubscriptions,
    Command,
    DeliverExtensionEvent,
    ExtensionRegistered,
    ExtensionRequestedNext,
    FinishInit,
    FlushTelemetry,
    Freeze,
    InitRequested,
    Invoke,
    InvokeRequested,
    OpenSubscriptions,
    PauseTelemetry,
    ProcessExited,
    ResponsePosted,
    RuntimeRequestedNext,
    ShutdownRequested,
    Subscribe,
    SubscriptionRequested,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.state import Settings, State
from lambdabox.core.subscriptions import Subscriptions
from lambdabox.core.telemetry import LOGS, TELEMETRY

BODY = {
    "schemaVersion": "2022-12-13",
    "types": ["platform"],
    "destination": {"protocol": "HTTP", "URI": "http://sandbox:1234"},
}
LOGS_BODY = {"types": ["function"], "destination": {"protocol": "TCP", "port": 4321}}


def in_init(freeze: bool = True) -> Lifecycle:
    """An environment in its Init, with one extension ("ext", identifier "id-ext") registered for both events."""
    lc = Lifecycle(Settings("fn", "$LATEST", 3.0, ("ext",), freeze=freeze))
    lc.handle(InitRequested(), T0)
    lc.handle(ExtensionRegistered("ext", ("INVOKE", "SHUTDOWN"), "id-ext"), T0)
    return lc


def subscribe(lc: Lifecycle, api: str = TELEMETRY, body: Any = BODY, identifier: str = "id-ext") -> list[Command]:
    return lc.handle(SubscriptionRequested(api, identifier, body), T0 + 0.1)


def finish_init(lc: Lifecycle) -> list[Command]:
    lc.handle(RuntimeRequestedNext(), T0 + 0.2)
    return lc.handle(ExtensionRequestedNext("id-ext"), T0 + 0.25)


def refused(lc: Lifecycle, api: str = TELEMETRY, body: Any = BODY, identifier: str = "id-ext") -> ApiError:
    with pytest.raises(ApiError) as caught:
        subscribe(lc, api, body, identifier)
    return caught.value


def test_a_subscription_during_init_is_carried_out_and_announced() -> None:
    lc = in_init()
    commands = subscribe(lc)
    (command,) = of_type(commands, Subscribe)
    assert command.extension == "ext"
    assert command.subscription.api == TELEMETRY
    assert command.subscription.destination.port == 1234
    assert platform(commands, "platform.telemetrySubscription") == [
        {"name": "ext", "state": "Subscribed", "types": ["platform"]}
    ]
    assert lc.subscriptions


def test_a_repeated_subscription_changes_nothing() -> None:
    lc = in_init()
    subscribe(lc)
    assert subscribe(lc) == []


def test_an_extension_uses_one_of_the_two_apis() -> None:
    lc = in_init()
    subscribe(lc, LOGS, LOGS_BODY)
    error = refused(lc, TELEMETRY, BODY)
    assert (error.status, error.error_type) == (400, "ValidationError")
    assert "only one of the Logs and Telemetry APIs" in error.message


def test_after_init_the_window_is_closed_for_each_api() -> None:
    lc = in_init()
    finish_init(lc)
    telemetry, logs = refused(lc, TELEMETRY, BODY), refused(lc, LOGS, LOGS_BODY)
    assert (telemetry.status, telemetry.error_type) == (403, "Telemetry.SubscriptionClosed")
    assert (logs.status, logs.error_type) == (403, "Logs.SubscriptionClosed")


def test_an_unknown_identifier_is_refused_before_the_body_is_read() -> None:
    error = refused(in_init(), TELEMETRY, "not a body", identifier="nobody")
    assert (error.status, error.error_type) == (403, "Extension.UnknownExtensionIdentifier")


def test_a_bad_body_is_refused_even_after_init() -> None:
    lc = in_init()
    finish_init(lc)
    error = refused(lc, LOGS, {"types": []})
    assert (error.status, error.error_type) == (400, "Logs.ValidationError")


def test_each_init_opens_the_window_and_its_end_closes_it() -> None:
    lc = Lifecycle(Settings("fn", "$LATEST", 3.0, ("ext",)))
    commands = lc.handle(InitRequested(), T0)
    assert isinstance(commands[0], OpenSubscriptions)  # before platform.initStart, which the new Init keeps
    lc.handle(ExtensionRegistered("ext", ("INVOKE", "SHUTDOWN"), "id-ext"), T0)
    ended = finish_init(lc)
    closed = [type(c) for c in ended if isinstance(c, CloseSubscriptions | FinishInit)]
    assert closed == [CloseSubscriptions, FinishInit]
    assert one(ended, FinishInit) == FinishInit("success")
    assert lc.initialized and lc.inits == 1


def test_a_subscriber_gets_its_records_before_shutdown_and_before_a_freeze() -> None:
    lc = in_init()
    subscribe(lc)
    commands = finish_init(lc)
    pause, freeze = one(commands, PauseTelemetry), one(commands, Freeze)
    assert commands.index(pause) < commands.index(freeze)
    assert pause.until == T0 + 0.25 + 6.0
    assert lc.state is State.FROZEN

    lc.handle(ShutdownRequested(), T0 + 1.0)  # the runtime gets SIGTERM first
    commands = lc.handle(ProcessExited(None, 0), T0 + 1.1)
    flush, shutdown = one(commands, FlushTelemetry), one(commands, DeliverExtensionEvent)
    assert shutdown.event["eventType"] == "SHUTDOWN"
    assert commands.index(flush) < commands.index(shutdown)
    assert flush.until == T0 + 1.1 + 0.5


def test_without_subscribers_nothing_waits_for_deliveries() -> None:
    lc = in_init()
    commands = finish_init(lc)
    assert not of_type(commands, PauseTelemetry)
    assert one(commands, Freeze) == Freeze()
    lc.handle(InvokeRequested(Invoke("r1", b"{}", "arn", TRACE)), T0 + 1.0)
    lc.handle(ResponsePosted("r1", b"{}", "application/json", T0 + 1.1), T0 + 1.1)
    lc.handle(RuntimeRequestedNext(), T0 + 1.2)
    lc.handle(ExtensionRequestedNext("id-ext"), T0 + 1.3)
    lc.handle(ShutdownRequested(), T0 + 2.0)
    assert not of_type(lc.handle(ProcessExited(None, 0), T0 + 2.1), FlushTelemetry)


def test_the_rules_on_their_own() -> None:
    subscriptions = Subscriptions()
    accepted = subscriptions.accept(LOGS, "a", LOGS_BODY, during_init=True)
    assert accepted is not None and accepted.destination.protocol == "TCP"
    assert subscriptions.accept(LOGS, "a", LOGS_BODY, during_init=True) is None
    assert subscriptions.accept(TELEMETRY, "b", BODY, during_init=True) is not None
    subscriptions.clear()
    assert not subscriptions
    with pytest.raises(ApiError):
        subscriptions.accept(LOGS, "a", LOGS_BODY, during_init=False)
