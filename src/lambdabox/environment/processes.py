"""One environment's processes: each started inside its isolation, watched by a task of the environment's group, its
exit reported as a fact (with the Init that started it and the memory cgroup's OOM count); all killed and reaped."""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Callable

from lambdabox.core import facts as f
from lambdabox.core.state import SLACK_S
from lambdabox.environment.observers import Observers
from lambdabox.environment.report import TelemetryEvent
from lambdabox.sandbox.isolation import Isolation
from lambdabox.sandbox.processes import OwnedProcess


class Processes:
    """The live processes by name (None is the runtime)."""

    def __init__(
        self,
        isolation: Isolation,
        observers: Observers,
        tasks: asyncio.TaskGroup,
        now: Callable[[], float],
        report: Callable[[f.ProcessExited], None],
    ) -> None:
        self._isolation = isolation
        self._observers = observers
        self._tasks = tasks
        self._now = now
        self._report = report  # an exit, as a fact for the core
        self._live: dict[str | None, OwnedProcess] = {}
        self.watchers: set[asyncio.Task[None]] = set()

    async def start(
        self, name: str | None, generation: int, argv: list[str], env: dict[str, str], telemetry_fd: bool = False
    ) -> None:
        """Start a process of the environment; one that cannot be started is reported as exited (127)."""
        label = "runtime" if name is None else name
        kind = "function" if name is None else "extension"
        try:
            process = await OwnedProcess.start(
                argv,
                env=env,
                cwd="/var/task",
                spawn=functools.partial(self._isolation.spawn, ahead=name is not None),  # the runtime starts last
                label=label,
                on_record=lambda source, text: self._observers(TelemetryEvent(self._now(), kind, text, source)),
                telemetry_fd=telemetry_fd,
            )
        except Exception as error:
            self._observers.log(f"lambdabox: cannot start {label}: {error}")
            self._report(f.ProcessExited(name, 127, generation=generation))
            return
        self._isolation.register(process.pid)
        self._live[name] = process
        watcher = self._tasks.create_task(self._watch(name, generation, process), name=f"lambdabox-watch-{label}")
        self.watchers.add(watcher)
        watcher.add_done_callback(self.watchers.discard)

    def signal(self, name: str | None, sig: int) -> None:
        if (process := self._live.get(name)) is not None:
            process.signal(sig)

    async def kill_all(self) -> None:
        """SIGKILL every process of the environment (its descendants too) and reap them, within the slack."""
        processes, self._live = list(self._live.values()), {}
        for process in processes:
            process.signal(signal.SIGKILL)
        await self._isolation.kill_all()
        async with asyncio.timeout(SLACK_S):
            await asyncio.gather(*(p.wait_exit() for p in processes))

    async def _watch(self, name: str | None, generation: int, process: OwnedProcess) -> None:
        """Report the process's exit (a task of the group: it never raises)."""
        try:
            returncode = await process.wait_exit()
            oom_kills: int | None = self._isolation.oom_kill_count()
        except Exception as error:
            self._observers.log(f"lambdabox: lost track of {process.label}: {error!r}")
            returncode, oom_kills = process.returncode if process.returncode is not None else -signal.SIGKILL, None
        if self._live.get(name) is process:
            del self._live[name]
        self._report(f.ProcessExited(name, returncode, oom_kills, generation))
