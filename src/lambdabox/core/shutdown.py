"""One shutdown of an environment (a reset's or the final one): its reason and budget, and the commands of its
stages: SIGTERM with the runtime's share of the budget, SHUTDOWN for the extensions registered for it, and SIGKILL
for whatever is left (CONTRACT.md section 3)."""

from __future__ import annotations

from lambdabox.core import facts as f
from lambdabox.core import record
from lambdabox.core.extensions import ExtensionRegistry
from lambdabox.core.output import Output


class Shutdown:
    """One shutdown, from ``begin`` to ``finish``; the lifecycle decides when each step happens."""

    def __init__(self, reason: str, out: Output) -> None:
        self.reason = reason
        self.deadline = 0.0  # epoch seconds: the end of the whole budget
        self._out = out

    def begin(self, now: float, budget: tuple[float, float], *, reset: bool, runtime_alive: bool) -> bool:
        """Arm the budget (total, the runtime's share) and SIGTERM a live runtime; False when the budget is 0 ms
        (nothing is waited for)."""
        total, runtime_share = budget
        self.deadline = now + total
        self._out.mark_phase(f.SHUTDOWN_START, reason=self.reason, reset=reset)
        self._out.add(f.CancelTimer(f.Timer.INIT), f.CancelTimer(f.Timer.INVOKE))
        if total == 0.0:
            return False
        self._out.add(f.ArmTimer(f.Timer.SHUTDOWN, self.deadline))
        if runtime_alive:
            self._out.add(f.TerminateRuntime(), f.ArmTimer(f.Timer.RUNTIME_SHUTDOWN, now + runtime_share))
            self._out.mark(f.SIGNAL, None, signal="SIGTERM")
        return True

    def send_events(self, registry: ExtensionRegistry, alive: set[str | None], flush_until: float | None) -> None:
        """SHUTDOWN to each live extension registered for it (instead of any event still kept for it)."""
        event = record.shutdown_event(self.reason, self.deadline)
        for extension in registry.subscribed("SHUTDOWN"):
            if extension.name in alive:
                extension.pending.clear()
                registry.send(extension.identifier, event, self._out, flush_until=flush_until)

    def kill_runtime(self) -> None:
        """The runtime's share is over and it still runs."""
        self._out.add(f.Kill(None))
        self._out.mark(f.SIGNAL, None, signal="SIGKILL")

    def end_runtime_stage(self) -> None:
        self._out.add(f.CancelTimer(f.Timer.RUNTIME_SHUTDOWN))

    def finish(self, alive: set[str | None], *, reset: bool) -> None:
        """SIGKILL for whatever is left (``alive``), and the shutdown is over."""
        self._out.add(f.CancelTimer(f.Timer.SHUTDOWN), f.CancelTimer(f.Timer.RUNTIME_SHUTDOWN), f.KillAll())
        for name in sorted(alive, key=lambda n: (n is not None, n or "")):  # the runtime first
            self._out.mark(f.SIGNAL, name, signal="SIGKILL")
        self._out.mark_phase(f.SHUTDOWN_END, reason=self.reason, reset=reset)
        self._out.add(f.FinishShutdown(self.reason, reset=reset))
