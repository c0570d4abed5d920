"""lambdabox.testing used directly, as plain synchronous code: functions built inline and from templates, invokes,
events, extension steps, waits with deadlines, and the assertion helpers' messages."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from lambdabox.core.errors import LayerError, TemplateError
from lambdabox.core.model import FunctionFailure, LambdaFailure, Response
from lambdabox.environment.report import Report, TelemetryEvent
from lambdabox.testing import (
    EXTENSION_STATES,
    PYTHON_RUNTIME,
    ExtensionEvent,
    Invocation,
    WaitTimedOut,
    assert_event_order,
    assert_invoke_failed,
    assert_invoked_ok,
    function_from_code,
    function_from_template,
)
from support import build_layer, extension_script

ECHO = "def handler(event, context):\n    print('got', event)\n    return event\n"
FAIL = "def handler(event, context):\n    print('about to fail')\n    raise ValueError('boom')\n"
SLEEP = "import time\n\ndef handler(event, context):\n    time.sleep(event['seconds'])\n    return 'slept'\n"


def platform_types(invocation: Invocation) -> list[str]:
    return [e.type for e in invocation.events if e.type.startswith("platform.")]


def lambdabox_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lambdabox-")]


def test_an_inline_function_with_an_extension_records_every_step() -> None:
    with function_from_code(code={"app.py": ECHO}, extensions={"ext": extension_script("ext.py")}) as fn:
        invocation = fn.invoke({"n": 1})
        assert fn.config.runtime == PYTHON_RUNTIME and fn.config.handler == "app.handler"
        assert invocation.ok and invocation.response == {"n": 1}
        assert invocation.error_type is None and invocation.error_message is None
        assert invocation.report.init_duration_ms is not None and invocation.report.status == "success"
        assert "got {'n': 1}" in invocation.logs and "got {'n': 1}" in fn.logs("runtime")
        assert all(line.startswith('{"ext"') for line in fn.logs("ext"))
        assert [r["requestId"] for r in fn.platform("report")] == [invocation.request_id]
        assert fn.platform("platform.start") == fn.platform("start") != []
        assert_event_order(fn.events, ["platform.initStart", "platform.extension", "platform.start", "platform.report"])
        cold_types = platform_types(invocation)  # Init's events belong to the cold invoke
        assert (cold_types[0], cold_types[-1]) == ("platform.initStart", "platform.report")
        warm = fn.invoke({"n": 2})
        assert platform_types(warm) == ["platform.start", "platform.runtimeDone", "platform.report"]
        assert "got {'n': 2}" in warm.logs and "got {'n': 1}" not in warm.logs
    steps = fn.extension_events("ext")
    assert [s.state for s in steps] == [
        "Started", "Ready", "Waiting", "INVOKE", "Waiting", "INVOKE", "Waiting", "SHUTDOWN", "Exited"
    ]  # fmt: skip
    assert steps[1].detail == "INVOKE, SHUTDOWN" and steps[2].detail == "init" and steps[4].detail == "invoke"
    assert [steps[3].request_id, steps[5].request_id] == [invocation.request_id, warm.request_id]
    assert steps[-1].detail == "exit status 0"
    assert [s.time for s in steps] == sorted(s.time for s in steps)
    assert lambdabox_threads() == [] and psutil.Process().children(recursive=True) == []
    assert not fn.config.code.exists() and not fn.config.layers[0].content.exists()  # the inline code and layer
    with pytest.raises(RuntimeError, match="cannot be invoked"):
        fn.invoke({})
    fn.shutdown()  # a second time does nothing


def test_code_and_layers_as_directories_zips_and_files(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text(
        "import helper, other\n\n"
        "def handler(event, context):\n    return [helper.VALUE, other.VALUE, open('/opt/data.txt').read()]\n"
    )
    zipped = build_layer(tmp_path / "other.zip", {"python/other.py": (b"VALUE = 2\n", 0o644)})
    layers = [{"python/helper.py": "VALUE = 1\n", "data.txt": b"from a layer"}, zipped]
    with function_from_code(code=code, layers=layers, memory=256, timeout=5, environment={"A": "b"}) as fn:
        assert assert_invoked_ok(fn.invoke()) == [1, 2, "from a layer"]
        assert fn.config.memory_mb == 256 and fn.config.timeout_s == 5 and fn.config.environment == {"A": "b"}
        assert [layer.name for layer in fn.config.layers] == ["layer1", "other.zip"]


def test_a_function_error_and_its_readable_failure() -> None:
    with function_from_code(code={"app.py": FAIL}) as fn:
        invocation = fn.invoke({})
    assert not invocation.ok and isinstance(invocation.outcome, FunctionFailure)
    assert invocation.error_type == "ValueError" and invocation.error_message == "boom"
    assert invocation.response["errorType"] == "ValueError"
    assert assert_invoke_failed(invocation, "ValueError") is invocation
    with pytest.raises(AssertionError) as failure:
        assert_invoked_ok(invocation)
    message = str(failure.value)
    assert f"invoke {invocation.request_id} failed" in message
    assert "function error ValueError: boom" in message and "REPORT status error" in message
    assert "[runtime] about to fail" in message and "[runtime] [ERROR] ValueError: boom" in message
    with pytest.raises(AssertionError, match=r"expected error Runtime.ExitError\nfunction error ValueError: boom"):
        assert_invoke_failed(invocation, "Runtime.ExitError")


def test_a_lambda_error_is_the_error_object_the_caller_gets() -> None:
    with function_from_code(code={"app.py": SLEEP}, timeout=1) as fn:
        invocation = fn.invoke({"seconds": 3})
        assert isinstance(invocation.outcome, LambdaFailure)
        assert invocation.response == {"errorType": "Sandbox.Timedout", "errorMessage": invocation.error_message}
        assert invocation.error_message is not None and invocation.error_message.endswith("after 1.00 seconds")
        with pytest.raises(AssertionError, match=r"Lambda error Sandbox\.Timedout: RequestId: "):
            assert_invoked_ok(invocation)
        assert fn.invoke({"seconds": 0}).response == "slept"  # the environment was reset and initialises again
        assert len(fn.platform("initStart")) == 2


def test_responses_are_decoded_when_they_are_json() -> None:
    report = Report("id", "success", None, 1.0, 1, 128, 10, None, None)

    def invocation(body: bytes) -> Invocation:
        return Invocation("id", Response(body), report, ())

    assert invocation(b'{"a": [1]}').response == {"a": [1]}
    assert invocation(b"plain text").response == "plain text"
    assert invocation(b"\xff\xfe").response == b"\xff\xfe"
    assert invocation(b"plain text").ok and invocation(b"").payload == b""


def test_waiting_for_an_extension_during_an_invoke() -> None:
    extensions = {"slow": extension_script("ext.py")}
    with function_from_code(
        code={"app.py": ECHO}, extensions=extensions, environment={"EXT_POST_INVOKE_S": "0.3"}
    ) as fn:
        pending = fn.start_invoke({"n": 2})
        delivered = fn.wait_for_extension("slow", "INVOKE")
        done = fn.wait_for_log('"what": "post-invoke-done"', source="slow")
        invocation = pending.result()
        assert pending.result() is invocation
        assert (
            delivered.request_id == invocation.request_id
            and json.loads(done.record)["requestId"] == delivered.request_id
        )
        waiting = fn.wait_for_extension("slow", "Waiting", count=2)  # after init, then after the invoke's work
        assert waiting.time - delivered.time >= 0.3
        runtime_done = fn.wait_for_event("platform.runtimeDone").time
        after_response_ms = invocation.report.post_runtime_extensions_ms  # from the runtime's /next to the extension's
        assert after_response_ms == pytest.approx((waiting.time - runtime_done) * 1000, abs=0.01)
        report = fn.wait_for_event("platform.report", lambda e: e.record["requestId"] == invocation.request_id)
        assert report.record["metrics"]["durationMs"] >= 300


def test_waits_end_at_their_deadline_with_what_was_seen() -> None:
    with function_from_code(code={"app.py": ECHO}) as fn:
        started = time.monotonic()
        with pytest.raises(WaitTimedOut) as failure:
            fn.wait_for_event("platform.report", timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 2.0
        assert "event 'platform.report' not seen; waited 0.2 s" in str(failure.value)
        assert "platform events: none" in str(failure.value)
        fn.invoke({})
        assert fn.wait_for_event("platform.report", timeout=0).type == "platform.report"  # already seen
        with pytest.raises(ValueError, match="unknown extension state 'Registered'; choose one of Started"):
            fn.wait_for_extension("ext", "Registered")
    started = time.monotonic()
    with pytest.raises(WaitTimedOut, match=r"'platform.start' \(occurrence 2\) not seen; the environment has been"):
        fn.wait_for_event("platform.start", count=2, timeout=30)
    assert time.monotonic() - started < 1.0  # nothing more can come: no need to wait out the deadline
    assert isinstance(failure.value, AssertionError)  # so that pytest shows it as a failed assertion


def test_initialize_runs_init_ahead_of_the_first_invoke() -> None:
    with function_from_code(code={"app.py": ECHO}, extensions={"ext": extension_script("ext.py")}) as fn:
        report = fn.initialize()
        assert report.record["status"] == "success"
        assert [s.state for s in fn.extension_events("ext")] == ["Started", "Ready", "Waiting"]
        assert fn.platform("start") == []
        assert fn.invoke({}).ok and len(fn.platform("initStart")) == 1


@pytest.mark.slow
def test_an_extension_still_running_at_the_shutdown_deadline_is_killed() -> None:
    environment = {"EXT_SHUTDOWN_S": "30"}
    with function_from_code(
        code={"app.py": ECHO}, extensions={"ext": extension_script("ext.py")}, environment=environment
    ) as fn:
        assert fn.invoke({}).ok
    steps = fn.extension_events("ext")
    assert [s.state for s in steps][-2:] == ["SHUTDOWN", "Killed"]
    shutdown_start = fn.wait_for_event("lambdabox.shutdownStart").time
    assert 1.95 <= steps[-1].time - shutdown_start < 3.0  # Lambda's 2 s budget with external extensions


def test_a_template_function_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text(
        "import os\n\ndef handler(event, context):\n    return {k: os.environ.get(k) for k in ('ONE', 'TWO')}\n"
    )
    template = tmp_path / "template.yaml"
    template.write_text(
        "Resources:\n  Fn:\n    Type: AWS::Serverless::Function\n    Properties:\n      CodeUri: src/\n"
        f"      Handler: app.handler\n      Runtime: {PYTHON_RUNTIME}\n"
        "      Environment:\n        Variables:\n          ONE: from-template\n          TWO: from-template\n"
    )
    overrides = {"timeout": 7, "memory": 256, "environment": {"TWO": "override"}}
    with function_from_template(template, extensions={"ext": extension_script("ext.py")}, **overrides) as fn:
        assert fn.invoke({}).response == {"ONE": "from-template", "TWO": "override"}
        assert fn.config.timeout_s == 7 and fn.config.memory_mb == 256 and fn.config.template == template
        assert [layer.name for layer in fn.config.layers] == ["extensions"]
        assert fn.wait_for_extension("ext", "INVOKE").name == "ext"
    threads = lambdabox_threads()
    with pytest.raises(TypeError, match="unknown override colour for Fn"):
        function_from_template(template, "Fn", colour="red")
    with pytest.raises(TemplateError, match="no function 'Missing'"):
        function_from_template(template, "Missing")
    assert lambdabox_threads() == threads == []


def test_a_function_that_cannot_start_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the inline layers are built
    with pytest.raises(LayerError, match=r"missing\.zip: no such file"):
        function_from_code(code=tmp_path / "missing.zip", layers=[{"data.txt": "x"}])
    assert lambdabox_threads() == [] and list(tmp_path.iterdir()) == []


def event(type_: str) -> TelemetryEvent:
    return TelemetryEvent(0.0, type_, {})


def test_assert_event_order_allows_others_between() -> None:
    events = [event("platform.initStart"), event("function"), event("platform.start"), event("platform.report")]
    assert_event_order(events, ["platform.initStart", "platform.report"])
    assert_event_order(events, [e.type for e in events], exact=True)
    steps = [ExtensionEvent(0.0, "x", state, {}) for state in EXTENSION_STATES]
    assert_event_order(steps, ["Ready", "SHUTDOWN", "Killed"])
    assert_event_order(["a", "b", "a"], ["b", "a"])


def test_assert_event_order_says_what_was_seen_and_where_it_stopped() -> None:
    events = [event("platform.initStart"), event("platform.start"), event("platform.report")]
    with pytest.raises(AssertionError) as failure:
        assert_event_order(events, ["platform.start", "platform.initStart"])
    assert str(failure.value) == (
        "expected ['platform.start', 'platform.initStart'] in this order: 'platform.initStart' not seen after "
        "'platform.start' (#2)\nseen (3):\n    #1 platform.initStart\n    #2 platform.start\n  > #3 platform.report"
    )
    with pytest.raises(AssertionError) as failure:
        assert_event_order(events, ["platform.initStart", "platform.report"], exact=True)
    assert "expected exactly ['platform.initStart', 'platform.report']" in str(failure.value)
    assert "  > #2 platform.start" in str(failure.value)  # the first difference
    many = [f"e{i}" for i in range(200)]
    with pytest.raises(AssertionError) as failure:
        assert_event_order(many, ["e150", "e10"])
    lines = str(failure.value).splitlines()
    assert len(lines) < 70 and "  > #152 e151" in lines and lines[-1] == "  (121 before, 19 after not shown)"
