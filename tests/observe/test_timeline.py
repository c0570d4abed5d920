"""The timeline: spans assembled from the core's marks (fed from a Lifecycle driven at chosen times, then from a real
environment), the self-contained HTML page, the compact view after REPORT on the console, ``lambdabox invoke
--timeline``, and the marks never reaching a Telemetry API subscriber."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lambdabox.core import facts as mark
from lambdabox.core.facts import (
    DeadlinePassed,
    EmitPlatformEvent,
    ExtensionRegistered,
    ExtensionRequestedNext,
    Fact,
    Invoke,
    InvokeRequested,
    ProcessExited,
    ResponsePosted,
    RuntimeRequestedNext,
    ShutdownRequested,
    Timer,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import FunctionConfig
from lambdabox.core.state import Settings
from lambdabox.core.telemetry import parse_telemetry_subscription
from lambdabox.environment.delivery import open_telemetry_hub
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult, TelemetryEvent
from lambdabox.observe.page import render_html
from lambdabox.observe.timeline import AFTER, PLATFORM, RUNTIME, RUNTIME_INIT, Section, Timeline
from support import FIXTURES, PYTHON, Recorder, collector, extension_script, make_function, run

T0 = 1_700_000_000.0
MARKS = (
    mark.PROCESS_START,
    mark.NEXT,
    mark.EVENT_DELIVERED,
    mark.RESPONSE,
    mark.INVOKE_END,
    mark.SHUTDOWN_START,
    mark.SIGNAL,
    mark.PROCESS_EXIT,
    mark.SHUTDOWN_END,
)


# ---- assembling, from a lifecycle driven at chosen times (no event loop) ----------------------------------------


class Driven:
    """A Lifecycle with marks on whose platform and lambdabox events go straight into a Timeline."""

    def __init__(self, extensions: tuple[str, ...] = ("ext",), timeout_s: float = 1.0) -> None:
        self.lc = Lifecycle(Settings("fn", "$LATEST", timeout_s, extensions, marks=True))
        self.timeline = Timeline()

    def at(self, seconds: float, fact: Fact) -> Driven:
        for command in self.lc.handle(fact, T0 + seconds):
            if isinstance(command, EmitPlatformEvent):
                self.timeline(TelemetryEvent(command.at, command.type, command.record))
        return self


def invoke(request_id: str = "r1") -> Invoke:
    return Invoke(request_id, b"{}", "arn:aws:lambda:us-east-1:123456789012:function:fn", "Root=1-0-0")


def cold(driven: Driven) -> Driven:
    """Extension starts at 0 and registers at 0.125; the runtime starts then and asks for /next at 0.5; the
    extension's init ends at 0.25. The invoke: first byte at 0.625, response at 0.75, runtime's /next at 0.875, the
    extension's at 1.25 (0.5 s after the response)."""
    driven.at(0.0, InvokeRequested(invoke()))
    driven.at(0.125, ExtensionRegistered("ext", ("INVOKE", "SHUTDOWN"), "id-ext"))
    driven.at(0.25, ExtensionRequestedNext("id-ext"))
    driven.at(0.5, RuntimeRequestedNext())
    driven.at(0.75, ResponsePosted("r1", b"{}", "application/json", first_byte_at=T0 + 0.625))
    driven.at(0.875, RuntimeRequestedNext())
    return driven.at(1.25, ExtensionRequestedNext("id-ext"))


def spans(section: Section, row: str) -> list[tuple[str, str, float, float]]:
    """(label, kind, start ms, end ms) from the section's start."""
    at = section.start
    return [(s.label, s.kind, (s.start - at) * 1000, (s.end - at) * 1000) for s in section.spans if s.row == row]


def test_init_spans_show_each_extension_then_the_runtime_and_function_init_as_one_bar() -> None:
    (init, _) = cold(Driven()).timeline.sections
    assert (init.phase, init.detail, init.status, init.ms) == ("init", "on-demand", "success", 500.0)
    assert init.rows() == [PLATFORM, RUNTIME, "ext"]
    assert spans(init, "ext") == [("start + register", "start", 0.0, 125.0), ("init", "init", 125.0, 250.0)]
    assert spans(init, RUNTIME) == [(RUNTIME_INIT, "init", 125.0, 500.0)]
    assert spans(init, PLATFORM) == [("init", "platform", 0.0, 500.0)]


def test_invoke_spans_split_the_extensions_work_at_the_response() -> None:
    (_, section) = cold(Driven()).timeline.sections
    assert (section.phase, section.request_id, section.number, section.ms) == ("invoke", "r1", 1, 750.0)
    assert spans(section, RUNTIME) == [
        ("function", "function", 0.0, 125.0),
        ("response", "response", 125.0, 250.0),
        (AFTER, "after", 250.0, 375.0),
    ]
    assert spans(section, "ext") == [("invoke", "work", 0.0, 250.0), (AFTER, "after", 250.0, 750.0)]
    assert spans(section, PLATFORM) == [("invoke", "platform", 0.0, 750.0)]
    assert section.held_open() == [("ext", 500.0)]


def test_short_work_after_the_response_is_not_called_out() -> None:
    driven = cold(Driven())
    driven.at(2.0, InvokeRequested(invoke("r2")))
    driven.at(2.125, ResponsePosted("r2", b"{}", "application/json", first_byte_at=T0 + 2.125))
    driven.at(2.125, RuntimeRequestedNext())
    driven.at(2.140625, ExtensionRequestedNext("id-ext"))  # 15.6 ms after the response
    section = driven.timeline.invoke("r2")
    assert section is not None and section.number == 2
    assert section.held_open() == []
    assert spans(section, "ext")[-1] == (AFTER, "after", 125.0, 140.625)


def test_a_timeout_shows_the_function_cut_off_and_the_shutdown_that_follows() -> None:
    driven = Driven(timeout_s=1.0)
    driven.at(0.0, InvokeRequested(invoke()))
    driven.at(0.125, ExtensionRegistered("ext", ("INVOKE", "SHUTDOWN"), "id-ext"))
    driven.at(0.25, ExtensionRequestedNext("id-ext"))
    driven.at(0.25, RuntimeRequestedNext())
    driven.at(1.25, DeadlinePassed(Timer.INVOKE))
    driven.at(1.375, ProcessExited(None, -15))
    driven.at(1.5, ExtensionRequestedNext("id-ext"))
    driven.at(1.625, ProcessExited("ext", 0))
    _, section, shutdown = driven.timeline.sections
    assert section.status == "timeout: Sandbox.Timedout"
    assert spans(section, RUNTIME) == [("function (timeout: Sandbox.Timedout)", "error", 0.0, 1000.0)]
    assert spans(section, PLATFORM) == [("invoke", "error", 0.0, 1000.0)]
    assert (shutdown.phase, shutdown.detail, shutdown.ms) == ("shutdown", "timeout, then a new Init", 375.0)
    assert spans(shutdown, RUNTIME) == [
        ("SIGTERM", "signal", 0.0, 0.0),
        ("SIGTERM to exit", "shutdown", 0.0, 125.0),
        ("signal: terminated", "exit", 125.0, 125.0),
    ]
    assert spans(shutdown, "ext") == [
        ("SHUTDOWN to exit", "shutdown", 250.0, 375.0),
        ("exit status 0", "exit", 375.0, 375.0),
    ]


def test_a_runtime_that_ignores_sigterm_shows_sigkill() -> None:
    driven = cold(Driven())
    driven.at(3.0, ShutdownRequested("spindown"))
    driven.at(3.5, DeadlinePassed(Timer.RUNTIME_SHUTDOWN))
    driven.at(5.0, DeadlinePassed(Timer.SHUTDOWN))
    shutdown = driven.timeline.sections[-1]
    assert spans(shutdown, RUNTIME)[1:] == [
        ("SIGTERM to exit", "shutdown", 0.0, 500.0),
        ("SIGKILL", "kill", 500.0, 500.0),
    ]
    assert spans(shutdown, "ext") == [
        ("SHUTDOWN to exit", "shutdown", 500.0, 2000.0),
        ("SIGKILL", "kill", 2000.0, 2000.0),
    ]
    assert "SIGKILL" in render_html(driven.timeline.sections)


def test_the_compact_view_scales_one_bar_per_process_to_the_invoke() -> None:
    text = cold(Driven()).timeline.compact("r1", width=12)
    assert text is not None
    header, init, runtime, ext = text.splitlines()
    assert header == "TIMELINE RequestId: r1\tDuration: 750.00 ms\t(one mark = 62.50 ms)"
    assert init == "  init 500.00 ms before it: runtime + function init 375.00 ms, ext 250.00 ms"
    assert runtime == "  runtime |##>>!!      | 125.00 ms function, 125.00 ms response, 125.00 ms after response"
    assert ext == "  ext     |====!!!!!!!!| 250.00 ms invoke, 500.00 ms after response  <- holds the invoke open"
    assert Timeline().compact("r1") is None


def test_the_compact_view_colours_work_after_the_response_on_a_terminal() -> None:
    text = cold(Driven()).timeline.compact("r1", width=12, color=True)
    assert text is not None and "\x1b[1;31m!\x1b[0m" in text


def test_events_the_timeline_does_not_know_are_ignored() -> None:
    timeline = Timeline()
    timeline(TelemetryEvent(T0, "function", "a log line", "runtime"))
    timeline(TelemetryEvent(T0, mark.NEXT, {"process": "runtime", "phase": "invoke"}))  # no section open
    assert timeline.sections == []
    assert "0 invoke(s)" in render_html([])


# ---- a real environment ----------------------------------------------------------------------------------------


def run_with_timeline(config: FunctionConfig, payloads: list[bytes]) -> tuple[list[InvokeResult], Timeline]:
    timeline = Timeline()

    async def go() -> list[InvokeResult]:
        async with open_environment(config, None, [timeline]) as env:
            return [await env.invoke(p) for p in payloads]

    return run(go()), timeline


@pytest.fixture(scope="module")
def two_invokes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[InvokeResult], Timeline]:
    """Two invokes; ``slow`` works 0.3 s after each INVOKE, ``quick`` (a shell script) asks for the next at once."""
    tmp_path = tmp_path_factory.mktemp("two")
    extensions = {"slow": "ext.py", "quick": "ext.sh"}
    config = make_function(tmp_path, extensions=extensions, environment={"EXT_POST_INVOKE_S": "0.3"})
    return run_with_timeline(config, [b"{}", b"{}"])


def test_a_real_run_has_an_init_two_invokes_and_a_shutdown(two_invokes) -> None:
    results, timeline = two_invokes
    assert [s.phase for s in timeline.sections] == ["init", "invoke", "invoke", "shutdown"]
    assert [s.request_id for s in timeline.sections[1:3]] == [r.request_id for r in results]
    for section in timeline.sections:
        assert section.end is not None and section.status == "success"
        assert set(section.rows()) == {PLATFORM, RUNTIME, "slow", "quick"}
        for span in section.spans:
            assert section.start <= span.start <= span.end <= section.end, span


def test_the_init_spans_match_the_reported_init_duration(two_invokes) -> None:
    results, timeline = two_invokes
    init = timeline.sections[0]
    assert init.ms == pytest.approx(results[0].report.init_duration_ms, abs=0.01)
    registered = max(s.end for s in init.spans if s.label == "start + register")
    (runtime,) = [s for s in init.spans if s.row == RUNTIME]
    assert runtime.label == RUNTIME_INIT and runtime.start == registered  # the runtime starts once all registered
    assert all(s.ms > 0 for s in init.spans)


def test_an_extension_working_after_the_response_holds_each_invoke_open(two_invokes) -> None:
    results, timeline = two_invokes
    for result, section in zip(results, timeline.sections[1:3], strict=True):
        assert section.ms == pytest.approx(result.report.duration_ms, abs=0.01)
        assert section.report["durationMs"] == result.report.duration_ms
        (after,) = [s for s in section.spans if s.row == "slow" and s.label == AFTER]
        # slow sleeps 0.3 s from the moment INVOKE reaches it, which is after the invoke began
        assert (after.end - section.start) * 1000 >= 300.0
        extensions_done = max(s.end for s in section.spans if s.row in ("slow", "quick"))
        assert section.end == extensions_done  # the invoke ended when the last extension asked for the next event
        assert "slow" in [name for name, _ in section.held_open()]
        kinds = [s.kind for s in section.spans if s.row == RUNTIME]
        assert kinds[:2] == ["function", "response"]
        function = next(s for s in section.spans if s.row == RUNTIME)
        assert function.ms < after.ms


def test_the_shutdown_shows_sigterm_shutdown_events_and_every_exit(two_invokes) -> None:
    _, timeline = two_invokes
    shutdown = timeline.sections[-1]
    assert shutdown.detail == "spindown"
    labels = {row: [(s.label, s.kind) for s in shutdown.spans if s.row == row] for row in shutdown.rows()}
    assert labels[RUNTIME][:2] == [("SIGTERM", "signal"), ("SIGTERM to exit", "shutdown")]
    assert labels[RUNTIME][2][1] in ("exit", "kill")
    for name in ("slow", "quick"):
        assert labels[name] == [("SHUTDOWN to exit", "shutdown"), ("exit status 0", "exit")]


TIP_TIMES = r"\n(\d+\.\d{3}) ms .*\nfrom \+(\d+\.\d{3}) ms to \+(\d+\.\d{3}) ms"


def test_the_html_page_is_self_contained_with_a_row_per_process_and_exact_tooltips(two_invokes) -> None:
    results, timeline = two_invokes
    page = render_html(timeline.sections, "lambdabox timeline: Fn")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?:", page), "no external reference of any kind"
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert page.count("<section>") == 4
    assert page.count("class=name") == 4 * 4  # four processes in each of the four sections
    for result in results:
        assert result.request_id in page
    tips = [html.unescape(t) for t in re.findall(r'title="([^"]*)"', page)]
    after = [t for t in tips if t.startswith("slow: after response\n")]
    assert len(after) == 2
    for tip in after:
        span_ms, start_ms, end_ms = map(float, re.search(TIP_TIMES, tip).groups())  # exact, to the microsecond
        assert end_ms >= 300.0 and span_ms == pytest.approx(end_ms - start_ms, abs=0.0015)
    assert page.count("class=warn") == 2 and "slow held the invoke open" in page
    shown = [float(ms) for ms in re.findall(r"post-runtime extensions duration (\d+\.\d+) ms", page)]
    assert shown == pytest.approx([r.report.post_runtime_extensions_ms for r in results], abs=0.011)  # as reported
    assert 'class="bar k-after long"' in page


def test_a_crash_shows_the_exit_in_the_invoke_and_the_reset_after_it(tmp_path: Path) -> None:
    config = make_function(tmp_path, "handler.crash")
    _, timeline = run_with_timeline(config, [b'{"code": 3}'])
    section = timeline.sections[1]
    assert section.status == "failure: Runtime.ExitError"
    assert ("exit status 3", "exit") in [(s.label, s.kind) for s in section.spans if s.row == RUNTIME]
    assert [s.phase for s in timeline.sections][:3] == ["init", "invoke", "shutdown"]
    assert "failure, then a new Init" in render_html(timeline.sections)


# ---- the Telemetry API never carries the marks -----------------------------------------------------------------


def test_the_hub_neither_buffers_nor_delivers_lambdabox_events() -> None:
    subscription = parse_telemetry_subscription(
        {
            "schemaVersion": "2022-12-13",
            "types": ["platform", "function", "extension"],
            "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:1/"},
        }
    )

    async def go() -> None:
        async with open_telemetry_hub() as hub:
            hub.open_init()
            hub.observe(TelemetryEvent(T0, "platform.initStart", {"initializationType": "on-demand"}))
            for type_ in MARKS:
                hub.observe(TelemetryEvent(T0, type_, {"process": "runtime"}))
            assert hub.buffered()[0] == 1  # the Init's buffer for late subscribers holds initStart only
            hub.subscribe("ext", subscription)
            for type_ in MARKS:
                hub.observe(TelemetryEvent(T0, type_, {"process": "runtime"}))
            assert hub.stats()["ext"].produced == 1

    run(go())


def test_a_telemetry_subscriber_gets_no_lambdabox_events(tmp_path: Path) -> None:
    recorder = Recorder()

    async def go() -> list[str]:
        async with collector() as sink:
            env_vars = {"TEL_SINK": sink.url}
            config = make_function(tmp_path, extensions={"sub": "telemetry_ext.py"}, environment=env_vars)
            async with open_environment(config, Options(), [recorder]) as env:
                await sink.listen_in(env)
                await env.invoke(b"{}")
            await sink.wait_for(lambda: "platform.report" in sink.types())
            return sink.types()

    types = run(go())
    assert "platform.runtimeDone" in types
    assert not [t for t in types if t.startswith("lambdabox.")]
    assert any(t.startswith("lambdabox.") for t in recorder.types(""))  # while the environment's observers got them


# ---- the command line ------------------------------------------------------------------------------------------


def cli_template(tmp_path: Path) -> Path:
    code, layer = tmp_path / "src", tmp_path / "layer" / "extensions"
    code.mkdir()
    layer.mkdir(parents=True)
    shutil.copy(FIXTURES / "handler.py", code / "handler.py")
    (layer / "lingers").write_bytes(extension_script("ext.py"))
    (layer / "lingers").chmod(0o755)
    template = tmp_path / "template.yaml"
    template.write_text(
        f"""
Transform: AWS::Serverless-2016-10-31
Resources:
  Ext:
    Type: AWS::Serverless::LayerVersion
    Properties: {{ContentUri: layer/}}
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: src/
      Handler: handler.ok
      Runtime: {PYTHON}
      Layers: [!Ref Ext]
      Environment:
        Variables:
          EXT_POST_INVOKE_S: "0.3"
"""
    )
    return template


def lambdabox(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lambdabox", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_invoke_prints_the_compact_timeline_after_each_report_and_writes_the_page(tmp_path: Path) -> None:
    page = tmp_path / "out" / "timeline.html"
    page.parent.mkdir()
    done = lambdabox("invoke", "-t", str(cli_template(tmp_path)), "--repeat", "2", "--timeline", str(page))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['{"ok": true, "event": {}}'] * 2  # stdout keeps the responses only
    lines = done.stderr.splitlines()
    reports = [i for i, line in enumerate(lines) if line.startswith("REPORT RequestId: ")]
    assert len(reports) == 2
    for i in reports:
        request_id = lines[i].split()[2]
        assert lines[i + 1].startswith(f"TIMELINE RequestId: {request_id}\tDuration: ")
    first = lines[reports[0] + 1 : reports[0] + 5]
    assert first[1].startswith("  init ") and "runtime + function init" in first[1]  # a cold start
    lingers = next(line for line in lines[reports[0] :] if line.startswith("  lingers "))
    assert "ms after response" in lingers and lingers.endswith("<- holds the invoke open")
    assert f"lambdabox: timeline written to {page}" in done.stderr
    text = page.read_text()
    assert "lambdabox timeline: Fn" in text and text.count("<section>") == 4
    assert not re.search(r"https?:", text)


def test_no_timeline_console_keeps_the_console_as_sam_prints_it(tmp_path: Path) -> None:
    done = lambdabox("invoke", "-t", str(cli_template(tmp_path)), "--no-timeline-console")
    assert done.returncode == 0, done.stderr
    assert "REPORT RequestId: " in done.stderr and "TIMELINE" not in done.stderr


def test_an_unwritable_timeline_path_is_refused_up_front(tmp_path: Path) -> None:
    done = lambdabox("invoke", "-t", str(cli_template(tmp_path)), "--timeline", str(tmp_path))
    assert done.returncode == 2 and "--timeline" in done.stderr and "START" not in done.stderr
