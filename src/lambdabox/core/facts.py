"""The vocabulary of the lifecycle core: facts that go in (past tense) and commands that come out (imperative)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from lambdabox.core.model import Outcome
from lambdabox.core.telemetry import Subscription


class Timer(enum.Enum):
    INIT = "init"
    INVOKE = "invoke"
    SHUTDOWN = "shutdown"
    RUNTIME_SHUTDOWN = "runtime-shutdown"


@dataclass(frozen=True)
class Invoke:
    """One invocation as the runtime and extensions see it."""

    request_id: str
    payload: bytes
    invoked_function_arn: str
    trace_id: str
    client_context: str | None = None
    cognito_identity: str | None = None


# ---- facts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitRequested:
    initialization_type: str = "on-demand"


@dataclass(frozen=True)
class InvokeRequested:
    invoke: Invoke


@dataclass(frozen=True)
class ShutdownRequested:
    reason: str = "spindown"


@dataclass(frozen=True)
class ExtensionRegistered:
    name: str
    events: tuple[str, ...]
    identifier: str


@dataclass(frozen=True)
class ExtensionRequestedNext:
    identifier: str | None


@dataclass(frozen=True)
class ExtensionErrorPosted:
    identifier: str | None
    error_type: str
    phase: str  # "init" or "exit"
    message: str = ""


@dataclass(frozen=True)
class RuntimeRequestedNext:
    pass


@dataclass(frozen=True)
class ResponsePosted:
    request_id: str
    body: bytes
    content_type: str
    first_byte_at: float


@dataclass(frozen=True)
class ErrorPosted:
    request_id: str
    error_type: str
    body: bytes


@dataclass(frozen=True)
class InitErrorPosted:
    error_type: str
    body: bytes


@dataclass(frozen=True)
class SubscriptionRequested:
    """An extension's ``PUT`` to the Logs API (``api`` "logs") or the Telemetry API ("telemetry"), body as parsed."""

    api: str
    identifier: str | None
    body: object


@dataclass(frozen=True)
class ProcessExited:
    extension: str | None  # None: the runtime
    returncode: int
    oom_kills: int | None = None  # the memory cgroup's OOM kill count when it ended; None where none is counted
    generation: int | None = None  # the Init that started it (from its Start command); None: the current one


@dataclass(frozen=True)
class DeadlinePassed:
    timer: Timer


Fact = (
    InitRequested
    | InvokeRequested
    | ShutdownRequested
    | ExtensionRegistered
    | ExtensionRequestedNext
    | ExtensionErrorPosted
    | RuntimeRequestedNext
    | ResponsePosted
    | ErrorPosted
    | InitErrorPosted
    | SubscriptionRequested
    | ProcessExited
    | DeadlinePassed
)

# ---- commands ------------------------------------------------------------------------------------------------
# Carried out in order. Those in AWAITED take time (a process to spawn or reap, deliveries to settle); the shell
# carries out every other one at once, and none behind an awaited command before that one is done.


@dataclass(frozen=True)
class StartExtension:
    name: str
    generation: int = 0  # which Init started it: handed back in its ProcessExited


@dataclass(frozen=True)
class StartRuntime:
    initialization_type: str
    generation: int = 0


@dataclass(frozen=True)
class DeliverInvoke:
    """Answer the runtime's pending /next with this invoke."""

    invoke: Invoke
    deadline: float  # epoch seconds


@dataclass(frozen=True)
class DeliverExtensionEvent:
    """Answer this extension's pending /event/next."""

    identifier: str
    event: dict[str, Any]


@dataclass(frozen=True)
class Respond:
    """Hand the invoke's outcome to its caller (as soon as it is known)."""

    request_id: str
    outcome: Outcome


@dataclass(frozen=True)
class FinishInvoke:
    """The invoke phase is over; the shell measures memory and reports."""

    request_id: str
    status: str  # success | error | failure | timeout
    error_type: str | None
    duration_ms: float
    init_duration_ms: float | None
    post_runtime_extensions_ms: float | None = None


@dataclass(frozen=True)
class ArmTimer:
    timer: Timer
    at: float


@dataclass(frozen=True)
class CancelTimer:
    timer: Timer


@dataclass(frozen=True)
class TerminateRuntime:
    """SIGTERM to the runtime: the start of a graceful shutdown."""


@dataclass(frozen=True)
class Kill:
    extension: str | None  # None: the runtime


@dataclass(frozen=True)
class KillAll:
    """SIGKILL every process of the environment and reap them."""


@dataclass(frozen=True)
class Freeze:
    pass


@dataclass(frozen=True)
class Thaw:
    pass


@dataclass(frozen=True)
class EmitPlatformEvent:
    type: str
    record: Any  # a mapping for most events; a string for platform.fault, as Lambda sends it
    at: float


@dataclass(frozen=True)
class FinishInit:
    """Init is over: ``status`` success, or error with ``error_type``."""

    status: str
    error_type: str | None = None


@dataclass(frozen=True)
class OpenSubscriptions:
    """A new Init: the previous Init's Logs and Telemetry API subscribers are retired, and the records of this Init
    are kept for the extensions that subscribe during it."""


@dataclass(frozen=True)
class Subscribe:
    """Deliver records to this extension's listener (a subscription the core accepted)."""

    extension: str
    subscription: Subscription


@dataclass(frozen=True)
class CloseSubscriptions:
    """Init is over: no extension subscribes until the next Init; its records need no longer be kept."""


@dataclass(frozen=True)
class FlushTelemetry:
    """Deliver every record produced so far to the subscribers, waiting until ``until`` (epoch seconds) at most."""

    until: float


@dataclass(frozen=True)
class PauseTelemetry:
    """Before a freeze: start no new delivery, and wait (until ``until`` at most) for those under way to end."""

    until: float


@dataclass(frozen=True)
class FinishShutdown:
    """Every process is gone; ``reset`` means the environment can initialise again."""

    reason: str
    reset: bool


Command = (
    StartExtension
    | StartRuntime
    | DeliverInvoke
    | DeliverExtensionEvent
    | Respond
    | FinishInvoke
    | ArmTimer
    | CancelTimer
    | TerminateRuntime
    | Kill
    | KillAll
    | Freeze
    | Thaw
    | EmitPlatformEvent
    | FinishInit
    | OpenSubscriptions
    | Subscribe
    | CloseSubscriptions
    | FlushTelemetry
    | PauseTelemetry
    | FinishShutdown
)
AWAITED: frozenset[type] = frozenset({StartExtension, StartRuntime, KillAll, FlushTelemetry, PauseTelemetry})

# ---- lambdabox.* events: the moments a timeline of the lifecycle is drawn from -----------------------------------
# With ``Settings.marks`` on, the core emits these as EmitPlatformEvent at its ``now``, beside Lambda's own platform
# events that mark the rest (platform.initStart, platform.extension for a registration, platform.initReport,
# platform.start). They are lambdabox's, not Lambda's: no Telemetry or Logs API subscriber ever gets them. Each record
# names its process as {"process": "runtime"} or {"process": "extension", "name": <name>}.

PROCESS_START = "lambdabox.processStart"  # StartExtension or StartRuntime is commanded
NEXT = "lambdabox.next"  # the runtime or an extension asked for its next event: {phase, requestId?}
EVENT_DELIVERED = "lambdabox.eventDelivered"  # an extension is handed INVOKE or SHUTDOWN: {eventType, requestId?}
RESPONSE = "lambdabox.response"  # the runtime posted its answer: {requestId, status, firstByteAt?, errorType?}
INVOKE_END = "lambdabox.invokeEnd"  # the invoke phase is over (Duration ends here): {requestId, status, errorType?}
SHUTDOWN_START = "lambdabox.shutdownStart"  # {reason, reset}
SIGNAL = "lambdabox.signal"  # SIGTERM to the runtime, or SIGKILL to a process still alive: {signal}
PROCESS_EXIT = "lambdabox.processExit"  # a live process ended by itself: {returncode, description}
SHUTDOWN_END = "lambdabox.shutdownEnd"  # every process is gone: {reason, reset}
