"""What one fact makes the lifecycle do, collected in order: its commands, the platform events it emits, and (with
marks on) the ``lambdabox.*`` marks a timeline is drawn from, all stamped with the fact's ``now``."""

from __future__ import annotations

from typing import Any

from lambdabox.core.facts import INVOKE_END, Command, EmitPlatformEvent
from lambdabox.core.record import who


class Output:
    """The commands of the fact being handled: ``begin`` with its time, add to them, ``take`` them."""

    def __init__(self, marks: bool) -> None:
        self.marks = marks
        self._now = 0.0
        self._commands: list[Command] = []

    def begin(self, now: float) -> None:
        self._now = now
        self._commands = []

    def take(self) -> list[Command]:
        commands, self._commands = self._commands, []
        return commands

    def add(self, *commands: Command) -> None:
        self._commands.extend(commands)

    def emit(self, type_: str, **record: Any) -> None:
        """A platform event (``platform.*``) whose record is a mapping."""
        self._commands.append(EmitPlatformEvent(type_, record, self._now))

    def emit_record(self, type_: str, record: dict[str, Any]) -> None:
        self._commands.append(EmitPlatformEvent(type_, record, self._now))

    def emit_text(self, type_: str, text: str) -> None:
        """A platform event whose record is a string, as Lambda sends ``platform.fault``."""
        self._commands.append(EmitPlatformEvent(type_, text, self._now))

    def mark(self, type_: str, name: str | None, **record: Any) -> None:
        """A ``lambdabox.*`` mark about one process (``name`` None: the runtime), if marks are on."""
        if self.marks:
            self._commands.append(EmitPlatformEvent(type_, {**who(name), **record}, self._now))

    def mark_phase(self, type_: str, **record: Any) -> None:
        """A ``lambdabox.*`` mark about the whole environment, if marks are on."""
        if self.marks:
            self._commands.append(EmitPlatformEvent(type_, record, self._now))

    def mark_invoke_end(self, request_id: str, status: str, error_type: str | None) -> None:
        """The invoke phase is over (before FinishInvoke, whose platform.report the shell emits on carrying it out)."""
        error = {"errorType": error_type} if error_type else {}
        self.mark_phase(INVOKE_END, requestId=request_id, status=status, **error)
