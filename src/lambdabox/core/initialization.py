"""One Init: its initialization type and start, which processes it started (its generation), whether the runtime has
asked for its first event, and the commands and records of its steps: begun, the runtime started, ended."""

from __future__ import annotations

from lambdabox.core import facts as f
from lambdabox.core import record
from lambdabox.core.output import Output
from lambdabox.core.state import INIT_TIMEOUT_S, Settings


class Initialization:
    """One Init, from ``begin`` to ``end``; the lifecycle decides when each step happens."""

    def __init__(self, initialization_type: str, started_at: float, generation: int, out: Output) -> None:
        self.initialization_type = initialization_type
        self.started_at = started_at
        self.generation = generation  # handed to the processes it starts, and back in their ProcessExited
        self.runtime_ready = False  # the runtime asked for its first event: runtime and function init are done
        self._out = out

    def begin(self, settings: Settings) -> None:
        """Arm Init's limit, emit platform.initStart, start the external extensions."""
        self._out.add(f.OpenSubscriptions(), f.ArmTimer(f.Timer.INIT, self.started_at + INIT_TIMEOUT_S))
        self._out.emit_record("platform.initStart", record.init_start(self.initialization_type, settings))
        for name in settings.extensions:
            self._out.add(f.StartExtension(name, self.generation))
            self._out.mark(f.PROCESS_START, name)

    def start_runtime(self) -> None:
        self._out.add(f.StartRuntime(self.initialization_type, self.generation))
        self._out.mark(f.PROCESS_START, None)

    def end(self, now: float, status: str, error_type: str | None = None) -> float:
        """Init is over (``status`` success or error): its records, and no more subscriptions; its duration in ms."""
        self._out.add(f.CancelTimer(f.Timer.INIT))
        duration = record.ms(now - self.started_at)
        for type_, fields in record.init_end(self.initialization_type, status, error_type, duration):
            self._out.emit_record(type_, fields)
        self._out.add(f.CloseSubscriptions(), f.FinishInit(status, error_type))
        return duration
