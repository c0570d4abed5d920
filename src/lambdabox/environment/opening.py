"""Opens one execution environment (:func:`open_environment`): stages its code and layers in a work directory,
isolates it, serves its APIs, and on the way out shuts it down as Lambda does and cleans up. The environment it
yields, the asyncio shell around the lifecycle core, is :class:`lambdabox.environment.runner.Environment`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lambdabox.api import extensions as extensions_api
from lambdabox.api import logs as logs_api
from lambdabox.api import runtime as runtime_api
from lambdabox.api import telemetry as telemetry_api
from lambdabox.api.httpserver import HttpServer, Router
from lambdabox.core.errors import ConfigError
from lambdabox.core.extensions import MAX_EXTENSIONS
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import FunctionConfig
from lambdabox.core.state import Settings
from lambdabox.environment.report import Observer
from lambdabox.environment.runner import SHUTDOWN_SLACK_S, Environment
from lambdabox.sandbox.filesystem import stage_function
from lambdabox.sandbox.isolation import open_isolation
from lambdabox.sandbox.namespace import Layout
from lambdabox.sandbox.netns import NetNamespace
from lambdabox.sandbox.runtime import find_node_ric, resolve_runtime

RUNTIME_API_ADDRESS = ("127.0.0.1", 9001)  # where Lambda serves the APIs, inside the environment's namespace


@dataclass(frozen=True)
class Options:
    freeze: bool = True
    isolate: bool = True
    private_network: bool = True  # a network namespace (outbound through slirp4netns); False: the host's network
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "lambdabox")
    initialization_type: str = "on-demand"


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
    config: FunctionConfig, options: Options | None = None, observers: Iterable[Observer] = ()
) -> AsyncIterator[Environment]:
    """Stage the code and layers, isolate, serve the APIs; on exit shut down as Lambda does and clean up."""
    options = options or Options()
    env = Environment(config, options, observers)
    work_dir = Path(tempfile.mkdtemp(prefix=f"lambdabox-{config.logical_id}-"))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, work_dir, True)
        env._staged = stage_function(config, work_dir)
        source = str(config.template or config.code)
        extensions = discover_extensions(env._staged.opt, source)
        (work_dir / "tmp").mkdir(mode=0o1777, exist_ok=True)
        layout = Layout(
            env._staged.task, env._staged.opt, work_dir / "tmp", keep=_keep_paths(config.runtime, options.cache_dir)
        )
        env._isolation = await stack.enter_async_context(
            open_isolation(
                layout,
                memory_mb=config.memory_mb,
                name=config.logical_id,
                isolate=options.isolate,
                network=options.private_network,
            )
        )
        env._runtime = await asyncio.to_thread(  # the first use of a runtime installs its client
            resolve_runtime,
            config.runtime,
            task_root=env._isolation.path("/var/task"),
            opt_root=env._isolation.path("/opt"),
            wrapper=config.environment.get("AWS_LAMBDA_EXEC_WRAPPER"),
            cache_dir=options.cache_dir,
            host_task_root=str(env._staged.task),
            host_opt_root=str(env._staged.opt),
        )
        env.lifecycle = Lifecycle(
            Settings(
                config.function_name, config.version, config.timeout_s, extensions, freeze=options.freeze, marks=True
            )
        )
        router = Router()
        runtime_api.add_routes(router, env)
        extensions_api.add_routes(router, env)
        logs_api.add_routes(router, env)
        telemetry_api.add_routes(router, env)
        if (net := env._isolation.net_namespace) is not None:
            env.netns = stack.enter_context(NetNamespace(net))
            env.hub.socket_factory = env.netns.socket
        server = HttpServer(router)
        stack.push_async_callback(server.close)
        await _serve(server, env)
        env.degraded = env._isolation.degraded
        worker = asyncio.get_running_loop().create_task(env._run_commands())
        stack.push_async_callback(_cancel, worker)
        stack.push_async_callback(env.hub.close)
        try:
            yield env
        finally:
            await env.shutdown()
            await _drain(env)


async def _serve(server: HttpServer, env: Environment) -> None:
    """Serve the APIs on an ephemeral port of the host's loopback (``host_api``), and, given a network namespace,
    inside it at 127.0.0.1:9001 as in Lambda (``runtime_api``); without one, the runtime uses the host's port."""
    host, port = await server.listen("127.0.0.1", 0)
    env._host_api = env._api_address = f"{host}:{port}"
    if env.netns is None:
        env._isolation.api_port = port
        return
    listener = env.netns.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(RUNTIME_API_ADDRESS)
        listener.listen(128)
        listener.setblocking(False)
        await server.serve_socket(listener)  # the server owns the socket from here on
    except BaseException:
        listener.close()
        raise
    env._api_address = "{}:{}".format(*RUNTIME_API_ADDRESS)


async def _drain(env: Environment) -> None:
    """Let the pending commands (the final KillAll and FinishShutdown) be carried out, with a deadline."""
    async with asyncio.timeout(SHUTDOWN_SLACK_S):
        await env.settled()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _keep_paths(runtime: str, cache_dir: Path) -> tuple[Path, ...]:
    """Host paths the runtime needs inside the environment even if they lie under /tmp (the runtimes' cache,
    the interpreter, lambdabox's own bootstrap scripts, the Node.js runtime client)."""
    import sys

    import lambdabox

    keep = {cache_dir, Path(sys.prefix), Path(sys.base_prefix), Path(lambdabox.__file__).parent}
    if runtime.startswith("nodejs"):
        with contextlib.suppress(ConfigError):  # resolve_runtime says what is missing
            keep.add(find_node_ric())
    return tuple(keep)
