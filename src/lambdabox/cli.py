"""The ``lambdabox`` command line: ``invoke`` a function of a SAM template, as ``sam local invoke`` does, and
``start-lambda``: serve the Lambda Invoke API for every function of a template, as ``sam local start-lambda`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from lambdabox.core import jsontext
from lambdabox.core.errors import ConfigError, LambdaboxError, error_body
from lambdabox.core.model import FunctionConfig, FunctionFailure, LambdaFailure, Outcome, Response
from lambdabox.environment.options import Options
from lambdabox.environment.report import Observer
from lambdabox.loop import open_task_group
from lambdabox.loop import run as run_loop
from lambdabox.observe.console import Console
from lambdabox.observe.logs_cli import logs
from lambdabox.observe.logstore import LogStore, open_logged_environment
from lambdabox.observe.page import render_html
from lambdabox.observe.timeline import Section, Timeline
from lambdabox.service.pool import DEFAULT_KEEP_ALIVE_S, default_max_concurrency
from lambdabox.service.server import DEFAULT_DESTINATIONS, DEFAULT_PORT, ServerSettings, open_server
from lambdabox.template.load import Template, load_template

F = TypeVar("F", bound=Callable[..., Any])

template_option = click.option(
    "-t",
    "--template",
    "template_path",
    type=click.Path(path_type=Path),
    default=Path("template.yaml"),
    show_default=True,
    help="SAM or CloudFormation template.",
)


def environment_options(command: F) -> F:
    """The options every command that starts environments shares: freeze, isolation, network, parameters."""
    options = [
        click.option(
            "--freeze/--no-freeze",
            default=True,
            show_default=True,
            help="Freeze the environment's processes between invokes, as Lambda does.",
        ),
        click.option(
            "--isolate/--no-isolate",
            default=True,
            show_default=True,
            help="Use a mount namespace and cgroups where the machine allows it.",
        ),
        click.option(
            "--private-network/--host-network",
            default=True,
            show_default=True,
            help="A network namespace per environment, as in Lambda (Runtime API at 127.0.0.1:9001; outbound "
            "through slirp4netns; this machine at host.lambdabox.internal, its loopback out of reach), or the host's "
            "network (extensions must not share ports).",
        ),
        click.option("--parameter-overrides", multiple=True, metavar="KEY=VALUE", help="Template parameter values."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lambdabox")
def main() -> None:
    """Run AWS Lambda functions and Lambda extensions locally, as the Lambda service runs them."""
    _raise_open_files_limit()


def _raise_open_files_limit() -> None:
    """The soft limit on open files raised to the hard one (as Go programs do at start): every environment holds a
    few descriptors here, and the Invoke API's connection cap is a share of this limit. The function still gets
    Lambda's 1,024 (the holder sets it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


timeline_option = click.option(
    "--timeline",
    "timeline_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    metavar="FILE.html",
    help="Write a self-contained HTML page with the timeline of every Init, invoke and shutdown of the run (of every "
    "environment): one row per process, one bar per phase, hover for exact figures.",
)


@main.command()
@click.argument("function", required=False)
@template_option
@click.option("-e", "--event", "event", default=None, help="Event file, or - for stdin. Default: {}.")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Invoke N times in the same warm environment.",
)
@environment_options
@timeline_option
@click.option(
    "--timeline-console/--no-timeline-console",
    default=True,
    show_default=True,
    help="After each REPORT line, a compact timeline: one bar per process, and the time each spent after the response.",
)
def invoke(
    function: str | None,
    template_path: Path,
    event: str | None,
    repeat: int,
    freeze: bool,
    isolate: bool,
    private_network: bool,
    parameter_overrides: tuple[str, ...],
    timeline_path: Path | None,
    timeline_console: bool,
) -> None:
    """Invoke FUNCTION (a logical id; optional when the template has one function) with EVENT.

    Each response (or Lambda's error object) is printed on stdout, one JSON document per line; logs go to
    stderr. The exit status is 0 only if every invoke succeeded.
    """
    try:
        overrides = dict(_pair(item) for item in parameter_overrides)
        config = load_template(template_path, overrides).function(function)
        payload = _read_event(event)
    except (LambdaboxError, OSError) as error:
        raise click.ClickException(str(error)) from error
    options = Options(freeze=freeze, isolate=isolate, private_network=private_network)
    timeline = Timeline() if timeline_path or timeline_console else None
    try:
        ok = run_loop(_invoke(config, payload, repeat, options, timeline, timeline_console=timeline_console))
    except LambdaboxError as error:
        raise click.ClickException(str(error)) from error
    if timeline is not None and timeline_path is not None:
        _write_timeline(timeline_path, timeline.sections, config.function_name)
    sys.exit(0 if ok else 1)


async def _invoke(
    config: FunctionConfig,
    payload: bytes,
    repeat: int,
    options: Options,
    timeline: Timeline | None = None,
    *,
    timeline_console: bool = False,
) -> bool:
    """Invoke ``repeat`` times; ``timeline`` observes the run, and its compact view follows each REPORT line."""
    console = Console()
    observers: list[Observer] = [console]
    if timeline is not None:
        color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        if timeline_console:
            console.after_report = lambda request_id: timeline.compact(request_id, color=color)
        observers.append(timeline)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ok = True
    async with open_logged_environment(config, options, observers, LogStore()) as env:
        for line in env.cleaned:
            click.echo(f"lambdabox: {line}", err=True)
        for line in env.degraded:
            click.echo(f"lambdabox: degraded mode: {line}", err=True)
        for _ in range(repeat):
            async with open_task_group() as group:
                task = group.create_task(env.invoke(payload))
                stopper = group.create_task(stop.wait())
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                task.cancel()  # (a signal came first: the invoke is cut short)
            if task.cancelled():
                ok = False
                break
            result = task.result()
            click.echo(render_outcome(result.outcome))
            ok = ok and isinstance(result.outcome, Response)
    return ok


def _write_timeline(path: Path, sections: list[Section], what: str) -> None:
    try:
        path.write_text(render_html(sections, f"lambdabox timeline: {what}"), encoding="utf-8")
    except OSError as error:
        raise click.ClickException(f"--timeline: cannot write {path}: {error}") from error
    click.echo(f"lambdabox: timeline written to {path}", err=True)


@main.command("start-lambda")
@template_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option(
    "-p",
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port (0: any free one).",
)
@click.option(
    "--warm-keep-alive",
    type=click.FloatRange(min=0),
    default=DEFAULT_KEEP_ALIVE_S,
    show_default=True,
    help="Seconds an idle environment stays warm before it is shut down.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=default_max_concurrency(),
    show_default=True,
    help="Concurrent executions across all functions (Lambda's account limit); beyond it, 429.",
)
@click.option(
    "--retry-delay-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Scale Lambda's asynchronous timings (retry delays of 1 and 2 minutes, maximum event age), e.g. 0.01.",
)
@click.option(
    "--destinations-file",
    type=click.Path(path_type=Path),
    default=DEFAULT_DESTINATIONS,
    show_default=True,
    help="JSON lines file for asynchronous destinations that are not functions of the template (SQS, SNS, ...).",
)
@click.option(
    "--open-ahead/--no-open-ahead",
    default=False,
    show_default=True,
    help="Open each function's next environment before its cold start needs it (the sandbox, the staged code and "
    "the APIs; its processes and Init still start at the invoke): about 20 ms off each cold start, for a holder "
    "and a slirp4netns process kept per function.",
)
@environment_options
@timeline_option
def start_lambda(
    template_path: Path,
    host: str,
    port: int,
    warm_keep_alive: float,
    max_concurrency: int,
    retry_delay_scale: float,
    destinations_file: Path,
    open_ahead: bool,
    freeze: bool,
    isolate: bool,
    private_network: bool,
    parameter_overrides: tuple[str, ...],
    timeline_path: Path | None,
) -> None:
    """Serve the Lambda Invoke API for every function of the template, for boto3, the AWS CLI and the SDKs.

    Where it listens and where asynchronous destination records go are printed on stdout; logs go to stderr.
    SIGINT or SIGTERM stops it: the invokes in flight finish, every environment is shut down, exit status 0.
    """
    try:
        template = load_template(template_path, dict(_pair(item) for item in parameter_overrides))
    except (LambdaboxError, OSError) as error:
        raise click.ClickException(str(error)) from error
    settings = ServerSettings(
        keep_alive_s=warm_keep_alive,
        max_concurrency=max_concurrency,
        time_scale=retry_delay_scale,
        destinations=destinations_file,
        environment=Options(freeze=freeze, isolate=isolate, private_network=private_network),
        logs=LogStore(),
        open_ahead=open_ahead,
    )
    timelines: list[Timeline] = []
    try:
        run_loop(_serve(template, host, port, settings, timelines if timeline_path else None))
    except (LambdaboxError, OSError) as error:
        raise click.ClickException(str(error)) from error
    finally:
        if timeline_path is not None:
            sections = sorted((s for t in timelines for s in t.sections), key=lambda s: s.start)
            _write_timeline(timeline_path, sections, f"start-lambda ({', '.join(template.functions)})")


async def _serve(
    template: Template, host: str, port: int, settings: ServerSettings, timelines: list[Timeline] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM; with ``timelines``, a Timeline observes each environment and is added to it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    started: Counter[str] = Counter()  # environments per function

    def environment_observers(config: FunctionConfig) -> list[Observer]:
        if timelines is None:
            return []
        started[config.logical_id] += 1
        timelines.append(Timeline(f"{config.logical_id} environment {started[config.logical_id]}"))
        return [timelines[-1]]

    async with open_server(
        template, host, port, settings, [Console()], environment_observers=environment_observers
    ) as server:
        names = ", ".join(template.functions)
        click.echo(f"lambdabox: serving the Lambda Invoke API on {server.url} (functions: {names})")
        click.echo(f"lambdabox: records for asynchronous destinations outside the template go to {server.destinations}")
        sys.stdout.flush()
        await stop.wait()
        click.echo("lambdabox: stopping: finishing the invokes in flight, shutting the environments down", err=True)


def render_outcome(outcome: Outcome) -> str:
    """One line: the response as the function returned it, or Lambda's error object."""
    match outcome:
        case Response(body=body):
            text = body.decode("utf-8", "replace")
        case FunctionFailure(body=body):
            text = body.decode("utf-8", "replace")
        case LambdaFailure(error_type=error_type, message=message):
            return error_body(error_type, message).decode()
    try:
        return json.dumps(jsontext.loads(text), ensure_ascii=False)
    except (ValueError, RecursionError):  # (json.dumps may recurse deeper than loads did)
        return text.replace("\n", "\\n")


def _read_event(event: str | None) -> bytes:
    if event is None:
        return b"{}"
    data = sys.stdin.buffer.read() if event == "-" else Path(event).read_bytes()
    try:
        jsontext.loads(data or b"null")
    except ValueError as error:
        raise ConfigError(f"{'stdin' if event == '-' else event}: the event is not valid JSON: {error}") from error
    return data


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--parameter-overrides: {item!r} is not KEY=VALUE")
    return key, value


main.add_command(logs)
