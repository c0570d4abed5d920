"""The ``lambdabox`` command line: ``invoke`` a function of a SAM template, as ``sam local invoke`` does."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import click

from lambdabox.console import Console
from lambdabox.core.errors import ConfigError, LambdaboxError
from lambdabox.core.model import FunctionConfig, FunctionFailure, LambdaFailure, Outcome, Response
from lambdabox.environment import Options, open_environment
from lambdabox.template import load_template


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lambdabox")
def main() -> None:
    """Run AWS Lambda functions and Lambda extensions locally, as the Lambda service runs them."""


@main.command()
@click.argument("function", required=False)
@click.option(
    "-t",
    "--template",
    "template_path",
    type=click.Path(path_type=Path),
    default=Path("template.yaml"),
    show_default=True,
    help="SAM or CloudFormation template.",
)
@click.option("-e", "--event", "event", default=None, help="Event file, or - for stdin. Default: {}.")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Invoke N times in the same warm environment.",
)
@click.option(
    "--freeze/--no-freeze",
    default=True,
    show_default=True,
    help="Freeze the environment's processes between invokes, as Lambda does.",
)
@click.option(
    "--isolate/--no-isolate",
    default=True,
    show_default=True,
    help="Use a mount namespace and cgroups where the machine allows it.",
)
@click.option("--parameter-overrides", multiple=True, metavar="KEY=VALUE", help="Template parameter values.")
def invoke(
    function: str | None,
    template_path: Path,
    event: str | None,
    repeat: int,
    freeze: bool,
    isolate: bool,
    parameter_overrides: tuple[str, ...],
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
    options = Options(freeze=freeze, isolate=isolate)
    try:
        ok = asyncio.run(_invoke(config, payload, repeat, options))
    except LambdaboxError as error:
        raise click.ClickException(str(error)) from error
    sys.exit(0 if ok else 1)


async def _invoke(config: FunctionConfig, payload: bytes, repeat: int, options: Options) -> bool:
    console = Console()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ok = True
    async with open_environment(config, options, [console]) as env:
        for line in env.degraded:
            click.echo(f"lambdabox: degraded mode: {line}", err=True)
        for _ in range(repeat):
            task = asyncio.create_task(env.invoke(payload))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
                ok = False
                break
            result = task.result()
            click.echo(render_outcome(result.outcome))
            ok = ok and isinstance(result.outcome, Response)
    return ok


def render_outcome(outcome: Outcome) -> str:
    """One line: the response as the function returned it, or Lambda's error object."""
    match outcome:
        case Response(body=body):
            text = body.decode("utf-8", "replace")
        case FunctionFailure(body=body):
            text = body.decode("utf-8", "replace")
        case LambdaFailure(error_type=error_type, message=message):
            return json.dumps({"errorType": error_type, "errorMessage": message})
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text.replace("\n", "\\n")


def _read_event(event: str | None) -> bytes:
    if event is None:
        return b"{}"
    data = sys.stdin.buffer.read() if event == "-" else Path(event).read_bytes()
    try:
        json.loads(data or b"null")
    except ValueError as error:
        raise ConfigError(f"{'stdin' if event == '-' else event}: the event is not valid JSON: {error}") from error
    return data


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--parameter-overrides: {item!r} is not KEY=VALUE")
    return key, value
