"""The Invoke API server: every function of a template behind one HTTP endpoint, each with a pool of environments
and a queue of asynchronous invokes, and the file where records for destinations outside the template go. One task
group holds every task of the server, its pools and its queues; ``Server.close`` ends them in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lambdabox.api import invoke as invoke_api
from lambdabox.api.httpserver import Limits, Router, open_http_server
from lambdabox.api.invoke import function_name
from lambdabox.api.ports import Answer
from lambdabox.core.model import FunctionConfig, Outcome
from lambdabox.core.state import invoke_budget_s
from lambdabox.environment.options import Options
from lambdabox.environment.report import Observer
from lambdabox.loop import open_task_group
from lambdabox.observe.logstore import LogStore
from lambdabox.sandbox.held import open_spares
from lambdabox.sandbox.namespace import files_dir
from lambdabox.service.asyncinvoke import EventQueue
from lambdabox.service.pool import DEFAULT_KEEP_ALIVE_S, Capacity, Pool, Ran, default_max_concurrency
from lambdabox.template.load import Template

DEFAULT_PORT = 3001  # as `sam local start-lambda`
DEFAULT_DESTINATIONS = Path(".lambdabox") / "destinations.jsonl"


@dataclass(frozen=True)
class ServerSettings:
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # an idle environment is shut down after this
    max_concurrency: int = field(default_factory=default_max_concurrency)  # concurrent executions, all functions
    time_scale: float = 1.0  # scales Lambda's asynchronous timings: retry delays and the maximum event age
    destinations: Path = DEFAULT_DESTINATIONS  # JSON lines: records for destinations that are not functions here
    environment: Options = field(default_factory=Options)
    logs: LogStore | None = None  # where every environment's log lines are kept (none: nowhere)
    limits: Limits = field(default_factory=invoke_api.limits)  # on the Invoke API's clients
    open_ahead: bool = False  # each function's next cold start finds its environment opened (see Pool)


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Server:
    """What the Invoke API hands requests to; its tasks, and its pools' and queues', belong to ``group`` and never
    raise (what goes wrong is told to ``report``). Use :func:`open_server`."""

    def __init__(
        self,
        template: Template,
        settings: ServerSettings,
        group: asyncio.TaskGroup,
        observers: Iterable[Observer] = (),
        report: Callable[[str], None] = _to_stderr,
        environment_observers: Callable[[FunctionConfig], Iterable[Observer]] = lambda config: (),
    ) -> None:
        self.template = template
        self.settings = settings
        self.destinations = settings.destinations.absolute()
        self._report = report
        self._group = group
        self.capacity = Capacity(settings.max_concurrency)
        self.pools = {
            name: Pool(
                config,
                self.capacity,
                group,
                options=settings.environment,
                keep_alive_s=settings.keep_alive_s,
                observers=observers,
                on_problem=self.report,
                log_store=settings.logs,
                environment_observers=functools.partial(environment_observers, config),
                ahead=settings.open_ahead,
            )
            for name, config in template.functions.items()
        }
        self.queues: dict[str, EventQueue] = {}
        self.address: tuple[str, int] = ("", 0)
        self._inflight: set[asyncio.Task[None]] = set()  # invokes under way (some past their caller's answer)
        self._said: set[str] = set()
        self._file: IO[str] | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def longest_invoke_s(self) -> float:
        """The longest an invoke may take, by Lambda's rules (Init, the timeout, and a margin to reap)."""
        return invoke_budget_s(max((config.timeout_s for config in self.template.functions.values()), default=0.0))

    # ---- the Invoke API's side --------------------------------------------------------------------------------

    def function(self, name: str) -> FunctionConfig | None:
        functions = self.template.functions
        if name in functions:
            return functions[name]
        found = [config for config in functions.values() if config.function_name == name]
        if not found and name == invoke_api.EMULATOR_NAME and len(functions) == 1:
            found = list(functions.values())
        return found[0] if found else None

    async def invoke(
        self, config: FunctionConfig, payload: bytes, *, client_context: str | None, invoked_arn: str, tail: bool
    ) -> Answer:
        pool = self.pools[config.logical_id]
        await pool.reserve_soon()
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Outcome] = loop.create_future()
        ran: asyncio.Future[Ran] = loop.create_future()
        ran.add_done_callback(_retrieved)  # a failure after the caller left is reported, not left unretrieved
        request_id = str(uuid.uuid4())

        def on_outcome(outcome: Outcome) -> None:
            if not answered.done():
                answered.set_result(outcome)

        run = functools.partial(
            pool.run,
            payload,
            request_id=request_id,
            client_context=client_context,
            invoked_function_arn=invoked_arn,
            on_outcome=on_outcome,
        )
        task = self._group.create_task(self._run(config, request_id, run, answered, ran))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        if tail:  # the tail ends with Lambda's END and REPORT lines, so it waits for the end of the invoke phase
            done = await asyncio.shield(ran)
            return Answer(request_id, done.result.outcome, done.log_result)
        either: set[asyncio.Future[Any]] = {answered, ran}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if answered.done():
            return Answer(request_id, answered.result())
        answered.cancel()
        return Answer(request_id, ran.result().result.outcome)

    async def _run(
        self,
        config: FunctionConfig,
        request_id: str,
        run: Callable[[], Awaitable[Ran]],
        answered: asyncio.Future[Outcome],
        ran: asyncio.Future[Ran],
    ) -> None:
        """One invoke in flight, as a task of the group: what it ends with goes to ``ran``, never to the group."""
        try:
            ran.set_result(await run())
        except asyncio.CancelledError:
            ran.cancel()
            raise
        except Exception as error:
            ran.set_exception(error)
            if answered.done():  # the caller had its answer; the operator hears of this
                self.report(f"lambdabox: {config.logical_id}: invoke {request_id} failed after its outcome: {error!r}")

    def enqueue(self, config: FunctionConfig, payload: bytes) -> str:
        return self.queues[config.logical_id].put(payload)

    def report(self, text: str) -> None:
        if text.startswith("lambdabox: degraded mode"):
            if text in self._said:
                return
            self._said.add(text)
        self._report(text)

    # ---- destinations -----------------------------------------------------------------------------------------

    def deliver(self, destination: str, record: dict[str, Any]) -> None:
        """An invocation record to a function of the template (invoked asynchronously), else to the file."""
        config = self._destination_function(destination)
        if config is not None:
            self.queues[config.logical_id].put(json.dumps(record).encode())
            return
        try:
            if self._file is None:
                self.destinations.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.destinations.open("a", encoding="utf-8")
            self._file.write(json.dumps({"destination": destination, "record": record}) + "\n")
            self._file.flush()
        except OSError as error:
            self.report(f"lambdabox: cannot write the record for {destination} to {self.destinations}: {error}")

    def _destination_function(self, destination: str) -> FunctionConfig | None:
        parsed = function_name(destination)
        if parsed is None or (destination.startswith("arn:") and ":lambda:" not in destination):
            return None
        config = self.function(parsed.name)
        return config if config is not None and parsed.matches(config) else None

    def _check_destinations(self) -> None:
        for config in self.template.functions.values():
            for destination in (config.event_invoke.on_success, config.event_invoke.on_failure):
                if destination is None or self._destination_function(destination) is not None:
                    continue
                if ":lambda:" in destination or not destination.startswith("arn:"):
                    self.report(
                        f"lambdabox: {config.logical_id}: destination {destination} is not a function of the "
                        f"template; its records go to {self.destinations}"
                    )

    # ---- life -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._check_destinations()
        for name, pool in self.pools.items():
            scale = self.settings.time_scale
            self.queues[name] = EventQueue(pool, self.deliver, self._group, time_scale=scale, log=self.report)
        async with open_task_group() as starting:
            for pool in self.pools.values():
                starting.create_task(pool.start())

    async def wait_settled(self) -> None:
        """Wait until every asynchronous invoke accepted so far, and those its destinations started, has ended."""
        while not all(queue.settled for queue in self.queues.values()):
            for queue in self.queues.values():
                await queue.wait_settled()

    async def close(self) -> None:
        """Stop the queues, let the invokes in flight finish (within their deadlines), shut every environment down."""
        async with open_task_group() as closing:
            for queue in self.queues.values():
                closing.create_task(queue.close())
        while self._inflight:
            await asyncio.wait(set(self._inflight))
        async with open_task_group() as closing:
            for pool in self.pools.values():
                closing.create_task(pool.close())
        if self._file is not None:
            self._file.close()


def _retrieved(future: asyncio.Future[Ran]) -> None:
    if not future.cancelled():
        future.exception()


@asynccontextmanager
async def open_server(
    template: Template,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: ServerSettings | None = None,
    observers: Iterable[Observer] = (),
    report: Callable[[str], None] = _to_stderr,
    environment_observers: Callable[[FunctionConfig], Iterable[Observer]] = lambda config: (),
) -> AsyncIterator[Server]:
    """Serve the Invoke API for every function of ``template`` (port 0: any free port; see ``Server.address``).

    ``observers`` observe every environment; ``environment_observers(config)`` is called as each environment of a
    function starts, for observers of that environment alone (a ``Timeline`` each, for example).
    On exit: stop accepting, let the requests and invokes in flight finish within their deadlines, shut every
    environment down as Lambda does (SHUTDOWN ``spindown``).
    """
    settings = settings or ServerSettings()
    async with open_spares(files_dir) as spares, open_task_group() as group:
        if settings.environment.isolate and settings.environment.spares is None:  # holders started ahead
            settings = dataclasses.replace(
                settings, environment=dataclasses.replace(settings.environment, spares=spares)
            )
            spares.fill()  # for the first cold start too
        server = Server(template, settings, group, observers, report, environment_observers)
        router = Router()
        invoke_api.add_routes(router, server)
        try:
            async with open_http_server(router, server.settings.limits) as http:
                try:
                    await server.start()
                    server.address = await http.listen(host, port)
                    yield server
                finally:
                    for queue in server.queues.values():
                        queue.stop()
                    await http.close(server.longest_invoke_s)  # no new connections; the requests in flight answered
        finally:
            await server.close()
