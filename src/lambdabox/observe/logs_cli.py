"""``lambdabox logs``: read a function's local log group back, as ``sam logs`` reads CloudWatch: every stream merged
in time order, one ``<stream> <time> <message>`` line per event; or one invoke's lines; or follow new ones.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from lambdabox.core.errors import LambdaboxError
from lambdabox.observe.logstore import ENV_VAR, LogEvent, LogStore, group_name
from lambdabox.template.load import load_template

POLL_INTERVAL_S = 0.2  # --tail: how often the group's files are looked at
DEFAULT_TEMPLATE = Path("template.yaml")
_RELATIVE = re.compile(
    r"^(\d+)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?)(\s+ago)?$", re.IGNORECASE
)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> int:
    """Epoch milliseconds for ``2024-05-01T10:00:00`` (UTC unless an offset is given), ``2024-05-01``,
    ``5mins ago``, ``10m``, ``2 hours ago``, ``1d``, ``yesterday`` or ``now``."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if (match := _RELATIVE.match(text)) is not None:
        unit = _UNITS[match.group(2)[0].lower()]
        moment = now - timedelta(**{unit: int(match.group(1))})
    elif text.lower() in ("now", "yesterday"):
        moment = now - timedelta(days=1 if text.lower() == "yesterday" else 0)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise click.BadParameter(
                f"{text!r} is neither a date and time (2024-05-01T10:00:00) nor a relative time (5mins ago)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def render(event: LogEvent) -> str:
    """As ``sam logs`` prints an event: stream, time (ISO 8601, UTC), message."""
    moment = datetime.fromtimestamp(event.timestamp / 1000, UTC)
    return f"{event.stream} {moment.strftime('%Y-%m-%dT%H:%M:%S.')}{event.timestamp % 1000:03d}Z {event.message}"


class Selection:
    """Which events are shown: a time range, a text, one invoke's lines (START to REPORT of that request id in its
    stream, what the stream logged between them, and any line naming the id). Fed every event in order."""

    def __init__(
        self, start: int | None = None, end: int | None = None, text: str | None = None, request_id: str | None = None
    ) -> None:
        self.start, self.end, self.text, self.request_id = start, end, text, request_id
        self._inside: set[str] = set()  # streams between the START and the REPORT of request_id

    def __call__(self, event: LogEvent) -> bool:
        if self.request_id is not None and not self._in_invoke(event):
            return False
        if self.start is not None and event.timestamp < self.start:
            return False
        if self.end is not None and event.timestamp > self.end:
            return False
        return self.text is None or self.text in event.message

    def _in_invoke(self, event: LogEvent) -> bool:
        message = event.message
        if message.startswith("START RequestId: "):
            if _request_id(message) == self.request_id:
                self._inside.add(event.stream)
                return True
            self._inside.discard(event.stream)
        elif message.startswith("REPORT RequestId: ") and _request_id(message) == self.request_id:
            self._inside.discard(event.stream)
            return True
        return event.stream in self._inside or str(self.request_id) in message


def _request_id(message: str) -> str:
    words = message.split(None, 3)
    return words[2] if len(words) > 2 else ""


def resolve_group(store: LogStore, function: str | None, template: Path | None) -> str:
    """The log group for FUNCTION: a logical id of the template, a function name, or a group name; without one,
    the only group there is."""
    if function is None:
        groups = store.groups()
        if len(groups) == 1:
            return groups[0]
        found = f"several log groups ({', '.join(groups)})" if groups else "no log groups"
        raise click.UsageError(f"{store.root} has {found}; name the FUNCTION")
    if function.startswith("/"):
        return function
    path = template or DEFAULT_TEMPLATE
    if template is not None or path.is_file():
        try:
            functions = load_template(path).functions
        except LambdaboxError as error:
            if template is not None:
                raise click.ClickException(str(error)) from error
            functions = {}
        if function in functions:
            return group_name(functions[function].function_name)
    return group_name(function)


def follow(store: LogStore, group: str, select: Selection, interval_s: float = POLL_INTERVAL_S) -> None:
    """Print the group's events, then the new ones as they are written, until Ctrl-C; streams that appear are
    followed too. A chunk per stream per round keeps memory bounded; it waits between rounds unless behind."""
    offsets: dict[str, int] = {}
    while True:
        batch: list[LogEvent] = []
        behind = False
        for stream in store.streams(group):
            try:
                size = store.path(group, stream).stat().st_size
            except FileNotFoundError:
                continue
            offset = offsets.get(stream, 0)
            if size <= offset:
                continue
            events, offsets[stream] = store.read(group, stream, offset)
            batch.extend(events)
            behind = behind or (bool(events) and offsets[stream] < size)
        show(sorted(batch, key=lambda e: e.timestamp), select)
        if not behind:
            time.sleep(interval_s)


def show(events: Iterable[LogEvent], select: Selection) -> int:
    shown = 0
    for event in events:
        if select(event):
            click.echo(render(event))
            shown += 1
    sys.stdout.flush()
    return shown


@click.command("logs")
@click.argument("function", required=False)
@click.option(
    "-t",
    "--template",
    "template_path",
    type=click.Path(path_type=Path),
    default=None,
    help="SAM or CloudFormation template, to name FUNCTION by its logical id. [default: template.yaml if present]",
)
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar=ENV_VAR,
    default=None,
    help=f"Where the logs are kept. [default: ${ENV_VAR}, else .lambdabox/logs]",
)
@click.option("--tail", is_flag=True, help="Print the events written from now on too, until Ctrl-C.")
@click.option("--request-id", default=None, help="Only this invoke's lines (START to REPORT).")
@click.option("-s", "--start-time", default=None, help="From this time: 2024-05-01T10:00:00 (UTC), or 5mins ago.")
@click.option("-e", "--end-time", default=None, help="Until this time, in the same forms.")
@click.option("--filter", "text", default=None, help="Only the events whose message contains TEXT.")
def logs(
    function: str | None,
    template_path: Path | None,
    log_dir: Path | None,
    tail: bool,
    request_id: str | None,
    start_time: str | None,
    end_time: str | None,
    text: str | None,
) -> None:
    """Print FUNCTION's logs kept by invoke and start-lambda, as `sam logs` does: `<stream> <time> <message>`.

    FUNCTION is the template's logical id or the function's name; optional when only one log group exists.
    """
    store = LogStore(log_dir)
    group = resolve_group(store, function, template_path)
    select = Selection(
        parse_time(start_time) if start_time else None, parse_time(end_time) if end_time else None, text, request_id
    )
    if not tail and not store.streams(group):
        raise click.ClickException(f"no logs for {group} in {store.root}")
    try:
        if tail:
            follow(store, group, select)
        else:
            show(store.events(group), select)
    except KeyboardInterrupt:  # the way out of --tail
        sys.stdout.flush()
    except BrokenPipeError:  # `lambdabox logs | head`: nothing more to say, and nothing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
