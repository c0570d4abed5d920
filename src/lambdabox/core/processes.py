"""The environment's processes as the lifecycle knows them: which are alive (None is the runtime), and what an exit
means: one of an Init given up on (ignored), one killed on purpose, or a crash, and whether the memory limit caused it
(the memory cgroup's OOM kill count rose since the exit before)."""

from __future__ import annotations

from dataclasses import dataclass

from lambdabox.core import record
from lambdabox.core.facts import ProcessExited


@dataclass(frozen=True)
class Exit:
    name: str | None  # None: the runtime
    description: str  # Lambda's wording: "exit status 1", "signal: killed"
    unexpected: bool  # it was alive: not one killed on purpose
    out_of_memory: bool


class Processes:
    """The processes started and not yet exited."""

    def __init__(self) -> None:
        self.alive: set[str | None] = set()
        self._oom_kills = 0  # at the last exit reported

    def __contains__(self, name: str | None) -> bool:
        return name in self.alive

    def exited(self, fact: ProcessExited, generation: int) -> Exit | None:
        """What the exit means; None for a process of an earlier Init (``generation`` is the current one)."""
        if fact.generation not in (None, generation):
            return None
        out_of_memory = fact.oom_kills is not None and fact.oom_kills > self._oom_kills
        self._oom_kills = max(self._oom_kills, fact.oom_kills or 0)
        unexpected = fact.extension in self.alive
        self.alive.discard(fact.extension)
        return Exit(fact.extension, record.exit_description(fact.returncode), unexpected, out_of_memory)
