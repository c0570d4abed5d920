"""Opens one execution environment (:func:`open_environment`): stages its code and layers in a work directory,
isolates it, serves its APIs, builds the :class:`~lambdabox.environment.runner.Environment` from these parts, and on
the way out shuts it down as Lambda does and takes every part down again, in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import lambdabox
from lambdabox.api import extensions as extensions_api
from lambdabox.api import logs as logs_api
from lambdabox.api import runtime as runtime_api
from lambdabox.api import telemetry as telemetry_api
from lambdabox.api.httpserver import HttpServer, Router, open_http_server
from lambdabox.core.errors import ConfigError, SandboxError
from lambdabox.core.extensions import MAX_EXTENSIONS
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import FunctionConfig
from lambdabox.core.state import SLACK_S, Settings
from lambdabox.environment.delivery import open_telemetry_hub
from lambdabox.environment.observers import Clock, Observers
from lambdabox.environment.options import Options
from lambdabox.environment.report import Observer
from lambdabox.environment.runner import Environment
from lambdabox.loop import open_task_group
from lambdabox.sandbox import leftovers
from lambdabox.sandbox.filesystem import stage_function
from lambdabox.sandbox.held import Holder
from lambdabox.sandbox.isolation import Isolation, open_isolation
from lambdabox.sandbox.namespace import RUNTIME_API_ADDRESS, Layout
from lambdabox.sandbox.runtime import find_node_ric, resolve_runtime
from lambdabox.sandbox.variables import log_stream_name


def discover_extensions(opt: Path, source: str) -> tuple[str, ...]:
    """Executable files in /opt/extensions, in the order Lambda starts them; more than 10 is refused."""
    directory = opt / "extensions"
    if not directory.is_dir():
        return ()
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK))
    if len(names) > MAX_EXTENSIONS:
        raise ConfigError(
            f"{source}: {len(names)} extensions in /opt/extensions ({', '.join(names)}); "
            f"a function may have at most {MAX_EXTENSIONS}"
        )
    return tuple(names)


@contextlib.asynccontextmanager
async def open_environment(
    config: FunctionConfig,
    options: Options | None = None,
    observers: Iterable[Observer] = (),
    *,
    on_reset: Callable[[], None] | None = None,
) -> AsyncIterator[Environment]:
    """Stage the code and layers, isolate, serve the APIs; on exit shut down as Lambda does and clean up.

    ``on_reset()`` is called each time the environment loses its Init by a reset (a crash, a timeout, an Init that
    failed), once the reset's shutdown is over."""
    options = options or Options()
    clock = Clock()
    work_dir = Path(tempfile.mkdtemp(prefix=leftovers.temporary_prefix(config.logical_id)))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(leftovers.remove_tree, work_dir)
        # Off the loop (a layer can hold tens of thousands of files); isolated, zips are extracted once per content.
        cache = options.cache_dir / "staged" if options.isolate else None
        staged = await asyncio.to_thread(stage_function, config, work_dir, cache)
        extensions = discover_extensions(staged.opt, str(config.template or config.code))
        (work_dir / "tmp").mkdir(mode=0o1777, exist_ok=True)
        keep = _keep_paths(config.runtime, options.cache_dir)
        layout = Layout(staged.task, staged.opt, work_dir / "tmp", keep=keep, tmp_mb=config.ephemeral_storage_mb)
        isolation = await stack.enter_async_context(
            open_isolation(
                layout,
                memory_mb=config.memory_mb,
                name=config.logical_id,
                isolate=options.isolate,
                network=options.private_network,
                spares=options.spares,
            )
        )
        resolve = functools.partial(
            resolve_runtime,
            config.runtime,
            task_root=isolation.path("/var/task"),
            opt_root=isolation.path("/opt"),
            wrapper=config.environment.get("AWS_LAMBDA_EXEC_WRAPPER"),
            cache_dir=options.cache_dir,
            host_task_root=str(staged.task),
            host_opt_root=str(staged.opt),
        )
        # The first use of a runtime installs its client. With namespaces, the runtime is at /var/lang and
        # /var/runtime as in Lambda; where those cannot be shown, at its host paths (which are visible too).
        runtime = await asyncio.to_thread(resolve, lambda_layout=isolation.namespaced)
        if isolation.namespaced and not isolation.show_runtime(runtime.lang, runtime.runtime_dir):
            runtime = await asyncio.to_thread(resolve, lambda_layout=False)
        netns = isolation.sockets
        router = Router()
        server = await stack.enter_async_context(open_http_server(router))
        host_api, in_environment_api = await _serve(server, netns, isolation)
        told: Observers  # the environment's observers, the hub's first (its failing listener is said to them)
        hub = await stack.enter_async_context(
            open_telemetry_hub(
                json_function_logs=config.environment.get("AWS_LAMBDA_LOG_FORMAT", "").upper() == "JSON",
                epoch=clock.now,
                socket_factory=None if netns is None else netns.socket,
                on_failing=lambda name: told.log(f"lambdabox: deliveries to {name}'s listener keep failing; retrying"),
                on_undelivered=lambda text: told.log(text),  # noqa: PLW0108 (told is bound below)
            )
        )
        told = Observers(observers, clock.now, telemetry=hub.observe)
        tasks = await stack.enter_async_context(open_task_group())
        settings = Settings(config.function_name, config.version, config.timeout_s, extensions, options.freeze, True)
        env = Environment(
            config,
            options,
            lifecycle=Lifecycle(settings),
            isolation=isolation,
            runtime=runtime,
            hub=hub,
            observers=told,
            now=clock.now,
            tasks=tasks,
            runtime_api=in_environment_api,
            host_api=host_api,
            netns=netns,
            log_stream=log_stream_name(config.version, clock.now()),
            on_reset=on_reset,
        )
        stack.push_async_callback(env.close)
        for api in (runtime_api, extensions_api, logs_api, telemetry_api):
            api.add_routes(router, env)
        try:
            yield env
        finally:
            await env.shutdown()
            async with asyncio.timeout(SLACK_S):  # the final KillAll and FinishShutdown are carried out
                await env.settled()


async def _serve(server: HttpServer, netns: Holder | None, isolation: Isolation) -> tuple[str, str]:
    """Serve the APIs on an ephemeral port of the host's loopback, and, given a network namespace, inside it at
    127.0.0.1:9001 as in Lambda; without one, the runtime uses the host's port. The two ``host:port``: lambdabox's,
    and the runtime's and extensions' (AWS_LAMBDA_RUNTIME_API)."""
    host, port = await server.listen("127.0.0.1", 0)
    if netns is None:
        isolation.api_port = port
        return f"{host}:{port}", f"{host}:{port}"
    listener = isolation.take_api_listener()  # made by the holder inside the namespace, listening
    if listener is None:
        raise SandboxError("the environment's holder gave no Runtime API listener")
    try:
        await server.serve_socket(listener)  # the server owns the socket from here on
    except BaseException:
        listener.close()
        raise
    return f"{host}:{port}", "{}:{}".format(*RUNTIME_API_ADDRESS)


def _keep_paths(runtime: str, cache_dir: Path) -> tuple[Path, ...]:
    """Host paths the runtime needs inside the environment even if they lie under /tmp (the runtimes' cache,
    the interpreter, lambdabox's own bootstrap scripts, the Node.js runtime client)."""
    # Made now: the environment shows only paths that exist when its filesystem is built, and a runtime's first use
    # installs it into the cache afterwards (what is made inside the cache later is seen).
    cache_dir.mkdir(parents=True, exist_ok=True)
    keep = {cache_dir, Path(sys.prefix), Path(sys.base_prefix), Path(lambdabox.__file__).parent}
    if runtime.startswith("nodejs"):
        with contextlib.suppress(ConfigError):  # resolve_runtime says what is missing
            keep.add(find_node_ric())
    return tuple(keep)
