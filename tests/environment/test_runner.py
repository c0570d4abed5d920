"""Integration: real awslambdaric and real extension processes over real HTTP, through one environment."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import psutil
import pytest

from lambdabox.api import runtime as runtime_api
from lambdabox.core.errors import ConfigError
from lambdabox.core.model import FunctionFailure, LambdaFailure, Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult, TelemetryEvent
from lambdabox.sandbox import runtime as runtime_module
from lambdabox.sandbox.isolation import Isolation
from lambdabox.sandbox.python_runtime import ensure_python_runtime
from lambdabox.sandbox.runtime import runtime_dir_for
from support import PYTHON, Recorder, make_function, run


def invoke_all(config, payloads, recorder=None, options=None) -> list[InvokeResult]:
    async def go() -> list[InvokeResult]:
        async with open_environment(config, options, [recorder] if recorder else []) as env:
            return [await env.invoke(json.dumps(p).encode()) for p in payloads]

    return run(go())


def body(result: InvokeResult):
    assert isinstance(result.outcome, Response | FunctionFailure), result.outcome
    return json.loads(result.outcome.body)


@pytest.mark.cgroup2
def test_cold_then_warm_invoke_with_no_extensions(tmp_path: Path, recorder: Recorder) -> None:
    first, second = invoke_all(make_function(tmp_path), [{"n": 1}, {"n": 2}], recorder)
    assert body(first) == {"ok": True, "event": {"n": 1}}
    assert body(second) == {"ok": True, "event": {"n": 2}}
    assert first.report.init_duration_ms is not None and first.report.init_duration_ms > 0
    assert second.report.init_duration_ms is None
    assert first.report.max_memory_used_mb > 1
    assert recorder.types() == [
        "platform.initStart", "platform.initRuntimeDone", "platform.initReport",
        "platform.start", "platform.runtimeDone", "platform.report",
        "platform.start", "platform.runtimeDone", "platform.report",
    ]  # fmt: skip
    assert "module loaded" in recorder.lines("runtime")


def test_a_runtime_installed_while_its_first_environment_is_made_is_seen_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fresh machine the runtime's cache does not exist yet when the first environment's filesystem is built:
    its first use installs it there (here: a copy of the installed one) once the environment is being made."""
    installed = Options().cache_dir
    minor = int(PYTHON.removeprefix("python3."))
    ensure_python_runtime(PYTHON, minor, runtime_dir_for(PYTHON, installed), installed)  # (installed once)
    fresh = tmp_path / "home" / "cache"

    def install(runtime: str, minor: int, runtime_dir: Path, cache_dir: Path) -> Path:
        assert cache_dir == fresh
        for part in ("lang", "runtime"):
            if not (cache_dir / part / runtime).exists():
                shutil.copytree(installed / part / runtime, cache_dir / part / runtime, symlinks=True)
        return ensure_python_runtime(runtime, minor, runtime_dir, cache_dir)

    monkeypatch.setattr(runtime_module, "ensure_python_runtime", install)
    (result,) = invoke_all(make_function(tmp_path), [{"n": 1}], options=Options(cache_dir=fresh))
    assert body(result) == {"ok": True, "event": {"n": 1}}


def test_extensions_get_invoke_and_shutdown_in_order(tmp_path: Path, recorder: Recorder) -> None:
    config = make_function(tmp_path, extensions={"py-ext": "ext.py", "sh-ext": "ext.sh"})
    results = invoke_all(config, [{}, {}], recorder)
    assert all(isinstance(r.outcome, Response) for r in results)
    events = [e["event"] for e in recorder.extension_says("event")]
    assert [e["eventType"] for e in events] == ["INVOKE", "INVOKE", "SHUTDOWN"]
    assert [e["requestId"] for e in events[:2]] == [r.request_id for r in results]
    invoke = events[0]
    assert invoke["invokedFunctionArn"] == config.arn
    assert invoke["tracing"]["type"] == "X-Amzn-Trace-Id" and invoke["tracing"]["value"].startswith("Root=1-")
    assert isinstance(invoke["deadlineMs"], int)
    assert events[2]["shutdownReason"] == "spindown"
    shell_lines = recorder.lines("sh-ext")
    assert shell_lines[0] == "sh-ext registered"
    assert sum('"INVOKE"' in line for line in shell_lines) == 2 and "sh-ext exiting" in shell_lines
    registered = recorder.extension_says("registered")[0]
    assert registered["body"] == {"functionName": "Fn", "functionVersion": "$LATEST", "handler": "handler.ok"}
    assert registered["runtime_only"] == []  # extensions do not see the runtime-only variables
    ext_names = [r["name"] for r in recorder.records("platform.extension")]
    assert sorted(ext_names) == ["py-ext", "sh-ext"]
    types = recorder.types()
    assert types.index("platform.extension") < types.index("platform.initRuntimeDone") < types.index("platform.start")


def test_response_is_returned_before_extension_post_invoke_work_ends(tmp_path: Path, recorder: Recorder) -> None:
    config = make_function(tmp_path, extensions={"slow": "ext.py"}, environment={"EXT_POST_INVOKE_S": "0.4"})
    (result,) = invoke_all(config, [{}], recorder)
    done = recorder.extension_says("post-invoke-done")
    assert done and done[0]["requestId"] == result.request_id
    assert result.report.duration_ms >= 400
    assert result.report.post_runtime_extensions_ms is not None and result.report.post_runtime_extensions_ms >= 350
    runtime_done_at = next(e.time for e in recorder.events if e.type == "platform.runtimeDone")
    report_at = next(e.time for e in recorder.events if e.type == "platform.report")
    assert report_at - runtime_done_at >= 0.35


def test_function_error_is_passed_through(tmp_path: Path) -> None:
    (result,) = invoke_all(make_function(tmp_path, "handler.fail"), [{}])
    assert isinstance(result.outcome, FunctionFailure)
    error = body(result)
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom"
    assert result.report.status == "error"


def test_handler_timeout_resets_and_keeps_tmp(tmp_path: Path, recorder: Recorder) -> None:
    config = make_function(tmp_path, "handler.sleep", timeout_s=1, extensions={"ext": "ext.py"})

    async def go() -> list[InvokeResult]:
        async with open_environment(config, None, [recorder]) as env:
            timed_out = await env.invoke(b'{"seconds": 30}')
            return [timed_out, await env.invoke(b'{"seconds": 0}')]

    timed_out, after = run(go())
    assert isinstance(timed_out.outcome, LambdaFailure)
    assert timed_out.outcome.error_type == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in timed_out.outcome.message
    assert timed_out.report.status == "timeout"
    assert body(after) == "slept"
    assert after.report.init_duration_ms is not None  # the next invoke initialised again
    shutdowns = [e["event"] for e in recorder.extension_says("event") if e["event"]["eventType"] == "SHUTDOWN"]
    assert [s["shutdownReason"] for s in shutdowns] == ["timeout", "spindown"]


def test_tmp_survives_a_reset(tmp_path: Path) -> None:
    crashed, after = invoke_all(make_function(tmp_path, "handler.tmp_write"), [{"crash": True}, {}])
    assert isinstance(crashed.outcome, LambdaFailure) and crashed.outcome.error_type == "Runtime.ExitError"
    assert after.report.init_duration_ms is not None  # a new init after the reset...
    assert body(after)["existed"] is True  # ...with the same /tmp


def test_extension_timeout_after_response(tmp_path: Path, recorder: Recorder) -> None:
    config = make_function(
        tmp_path, timeout_s=1, extensions={"hang": "ext.py"}, environment={"EXT_HANG_ON_INVOKE": "1"}
    )
    (result,) = invoke_all(config, [{}], recorder)
    assert isinstance(result.outcome, Response)  # the caller had the response before the extension hung
    assert result.report.status == "timeout"


def test_runtime_crash(tmp_path: Path) -> None:
    first, second = invoke_all(make_function(tmp_path, "handler.crash"), [{"code": 2}, {"code": 0}])
    assert isinstance(first.outcome, LambdaFailure)
    assert first.outcome.error_type == "Runtime.ExitError"
    assert "Runtime exited with error: exit status 2" in first.outcome.message
    assert second.report.init_duration_ms is not None


def test_extension_crash(tmp_path: Path) -> None:
    config = make_function(tmp_path, extensions={"bad": "ext.py"}, environment={"EXT_CRASH_ON_INVOKE": "1"})
    (result,) = invoke_all(config, [{}])
    assert result.report.status == "failure"
    assert result.report.error_type == "Extension.Crash"


def test_init_error_is_returned_and_next_invoke_initialises_again(tmp_path: Path, recorder: Recorder) -> None:
    first, second = invoke_all(make_function(tmp_path, "init_error.handler"), [{}, {}], recorder)
    for result in (first, second):
        assert isinstance(result.outcome, FunctionFailure)
        error = body(result)
        assert error["errorType"] == "RuntimeError"  # awslambdaric reports the module's own exception
        assert "init went wrong" in error["errorMessage"]
    assert recorder.types().count("platform.initStart") == 2
    assert [r["status"] for r in recorder.records("platform.initReport")] == ["error", "error"]


def test_extension_init_error_fails_every_init(tmp_path: Path) -> None:
    config = make_function(tmp_path, extensions={"e": "ext.py"}, environment={"EXT_INIT_ERROR": "Extension.Broken"})
    results = invoke_all(config, [{}] * 6)  # each invoke initialises again, while the last init's extension exits
    assert [r.outcome.error_type for r in results if isinstance(r.outcome, LambdaFailure)] == ["Extension.Broken"] * 6


def test_too_many_extensions_refused_before_start(tmp_path: Path) -> None:
    config = make_function(tmp_path, extensions={f"e{i:02}": "ext.py" for i in range(11)})
    with pytest.raises(ConfigError, match="at most 10"):
        invoke_all(config, [{}])


@pytest.mark.cgroup2
def test_out_of_memory(tmp_path: Path) -> None:
    config = make_function(tmp_path, "handler.hog", memory_mb=128)
    (result,) = invoke_all(config, [{"mb": 300}])
    assert isinstance(result.outcome, LambdaFailure)
    assert result.outcome.error_type == "Runtime.OutOfMemory"


def test_every_out_of_memory_is_reported_as_one_not_only_the_first(tmp_path: Path) -> None:
    """The cgroup's OOM kill counter only grows: each invoke is judged by its rise, not by its value."""
    config = make_function(tmp_path, "handler.hog", memory_mb=128, extensions={"e": "ext.py"})
    results = invoke_all(config, [{"mb": 300}, {"mb": 1}, {"mb": 300}, {"mb": 300}])
    kinds = [r.outcome.error_type if isinstance(r.outcome, LambdaFailure) else "ok" for r in results]
    assert kinds == ["Runtime.OutOfMemory", "ok", "Runtime.OutOfMemory", "Runtime.OutOfMemory"]


def test_response_over_6_mb_is_refused(tmp_path: Path) -> None:
    (result,) = invoke_all(make_function(tmp_path, "handler.big"), [{}])
    assert isinstance(result.outcome, FunctionFailure)
    assert result.outcome.error_type == "Function.ResponseSizeTooLarge"
    assert "(6291456 bytes)" in body(result)["errorMessage"]
    assert result.report.status == "failure"  # awslambdaric exits 1 on the 413, so the environment resets


def test_environment_variables_and_layout(tmp_path: Path) -> None:
    keys = ["AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "_HANDLER", "LAMBDA_TASK_ROOT", "TZ",
            "AWS_EXECUTION_ENV", "AWS_LAMBDA_INITIALIZATION_TYPE", "MY_VAR"]  # fmt: skip
    config = make_function(tmp_path, "handler.echo_env", environment={"MY_VAR": "mine"}, memory_mb=256)
    (result,) = invoke_all(config, [{"keys": keys}])
    seen = body(result)
    assert seen["AWS_LAMBDA_FUNCTION_NAME"] == "Fn" and seen["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert seen["_HANDLER"] == "handler.echo_env" and seen["MY_VAR"] == "mine"
    assert seen["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand" and seen["TZ"] == ":UTC"
    assert 0 < seen["remaining_ms"] <= 3000
    if os.geteuid() == 0:
        assert seen["LAMBDA_TASK_ROOT"] == "/var/task" and seen["cwd"] == "/var/task"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a mount namespace")
def test_sandbox_hostnames_resolve_to_loopback(tmp_path: Path) -> None:
    (result,) = invoke_all(make_function(tmp_path, "handler.resolve"), [{}])
    assert body(result) == {"sandbox": "127.0.0.1", "sandbox.localdomain": "127.0.0.1"}


def test_multiline_records_stay_whole(tmp_path: Path, recorder: Recorder) -> None:
    invoke_all(make_function(tmp_path, "handler.logs"), [{}], recorder)
    lines = recorder.lines("runtime")
    assert "line one" in lines and "to stderr" in lines
    assert any("multi\nline record" in line for line in lines)  # a logging record through the telemetry fd


@pytest.mark.cgroup2
def test_no_process_or_fd_left_behind(tmp_path: Path) -> None:
    config = make_function(tmp_path, extensions={"a": "ext.py", "b": "ext.sh"})
    me = psutil.Process()
    fds_before = len(os.listdir("/proc/self/fd"))
    invoke_all(config, [{}, {}])
    assert me.children(recursive=True) == []
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_no_freeze_option(tmp_path: Path) -> None:
    results = invoke_all(make_function(tmp_path), [{}, {}], options=Options(freeze=False))
    assert all(isinstance(r.outcome, Response) for r in results)


def test_processes_are_frozen_between_invokes(tmp_path: Path) -> None:
    import asyncio  # (only this test of the module waits by itself)

    config = make_function(tmp_path, extensions={"ext": "ext.py"})

    async def go() -> tuple[bool, InvokeResult]:
        async with open_environment(config) as env:
            await env.invoke(b"{}")
            await env.settled()  # the Freeze command given after the invoke has been carried out
            cgroups = env.isolation.cgroups
            assert cgroups is not None
            assert len(env.isolation.pids()) >= 2  # the runtime and the extension
            async with asyncio.timeout(10):  # the kernel completes a freeze on its own: wait, bounded, for it
                while True:
                    if cgroups.frozen():
                        break
                    await asyncio.sleep(0.005)
            return cgroups.frozen(), await env.invoke(b"{}")  # and thawed again for the next invoke

    frozen, second = run(go())
    assert frozen and isinstance(second.outcome, Response)


def test_a_frozen_runtime_is_thawed_just_after_its_event_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thaw comes behind the answer to the runtime's pending /next, so that the runtime wakes once, its event
    already there (not at the thaw, to wait again for the event)."""
    order: list[str] = []
    real_thaw, real_next = Isolation.thaw, runtime_api.next_invocation

    def thaw(self: Isolation) -> None:
        order.append("thaw")
        real_thaw(self)

    async def next_invocation(port: Any, request: Any) -> Any:
        answer = await real_next(port, request)
        order.append("event")  # the handler is done: the server writes its answer in this same step
        return answer

    monkeypatch.setattr(Isolation, "thaw", thaw)
    monkeypatch.setattr(runtime_api, "next_invocation", next_invocation)
    results = invoke_all(make_function(tmp_path), [{}, {}, {}])
    assert all(isinstance(r.outcome, Response) for r in results)
    assert order[:1] == ["event"]  # the first invoke: nothing was frozen yet
    assert order[1:5] == ["event", "thaw", "event", "thaw"]  # each later one: its event, then the thaw


def test_shutdown_budget_kills_a_slow_extension(tmp_path: Path, recorder: Recorder) -> None:
    config = make_function(tmp_path, extensions={"slow": "ext.py"}, environment={"EXT_SHUTDOWN_S": "30"})

    async def go() -> float:
        async with open_environment(config, None, [recorder]) as env:
            await env.invoke(b"{}")
            started = env.now()
            await env.shutdown()
            return env.now() - started

    took = run(go())
    assert 1.9 <= took < 3.5  # Lambda's 2 000 ms budget with external extensions, then SIGKILL
    assert recorder.extension_says("exiting") == []
    assert [e["event"]["eventType"] for e in recorder.extension_says("event")][-1] == "SHUTDOWN"


def test_shutdown_ends_when_extensions_exit(tmp_path: Path, recorder: Recorder) -> None:
    config = make_function(tmp_path, extensions={"quick": "ext.py"}, environment={"EXT_SHUTDOWN_S": "0.1"})

    async def go() -> float:
        async with open_environment(config, None, [recorder]) as env:
            await env.invoke(b"{}")
            started = env.now()
            await env.shutdown()
            return env.now() - started

    assert run(go()) < 1.5
    assert len(recorder.extension_says("exiting")) == 1


def test_degraded_mode_says_what_differs(tmp_path: Path) -> None:
    config = make_function(tmp_path, "handler.echo_env", extensions={"ext": "ext.py"})

    async def go() -> tuple[tuple[str, ...], InvokeResult]:
        async with open_environment(config, Options(isolate=False)) as env:
            return env.degraded, await env.invoke(b'{"keys": ["LAMBDA_TASK_ROOT"]}')

    degraded, result = run(go())
    assert degraded and any("/var/task" in line for line in degraded)
    assert body(result)["LAMBDA_TASK_ROOT"] != "/var/task"


def test_host_network_reaches_services_on_the_host_and_private_network_does_not(tmp_path: Path) -> None:
    from aiohttp import web

    config = make_function(tmp_path, "handler.fetch")

    async def go() -> list[InvokeResult]:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="from the host")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        try:
            results = []
            for private in (False, True):
                async with open_environment(config, Options(private_network=private)) as env:
                    results.append(await env.invoke(json.dumps({"url": url}).encode()))
            return results
        finally:
            await runner.cleanup()

    shared, private = run(go())
    assert body(shared) == {"status": 200, "body": "from the host"}
    if os.geteuid() == 0:
        assert body(private) == {"error": "URLError"}  # only loopback inside the environment's namespace


def broken_observer(event: TelemetryEvent) -> None:
    raise RuntimeError("an observer's bug")


def test_an_observer_that_always_raises_neither_hangs_an_invoke_nor_silences_the_others(
    tmp_path: Path, recorder: Recorder, capfd: pytest.CaptureFixture[str]
) -> None:
    config = make_function(tmp_path, extensions={"py-ext": "ext.py"})

    async def go() -> tuple[list[InvokeResult], float]:
        async with open_environment(config, None, [broken_observer, recorder]) as env:
            started = env.now()
            results = [await env.invoke(b"{}") for _ in range(3)]
            return results, env.now() - started

    results, elapsed = run(go())
    assert [type(r.outcome) for r in results] == [Response, Response, Response]
    assert elapsed < config.timeout_s  # answered as usual: before the fix the first invoke hung for its whole budget
    assert recorder.types().count("platform.report") == 3  # the others still see every event
    said = [line for line in recorder.lines("lambdabox") if "an observer of the environment" in line]
    assert len(said) == 1 and 'RuntimeError("an observer\'s bug")' in said[0]  # said once; later ones counted
    err = capfd.readouterr().err
    assert "an observer of the environment" in err and "later failures are counted" in err
    assert re.search(r"an observer of the environment \(.*broken_observer.*\) failed \d+ times", err)


def test_a_command_that_fails_is_reported_and_the_next_ones_go_on(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Isolation) -> None:
        raise OSError("the freezer refused")

    monkeypatch.setattr(Isolation, "freeze_at_once", refuse)
    first, second = invoke_all(make_function(tmp_path), [{"n": 1}, {"n": 2}], recorder)
    assert body(first)["event"] == {"n": 1} and body(second)["event"] == {"n": 2}
    failures = [line for line in recorder.lines("lambdabox") if line.startswith("lambdabox: Freeze failed")]
    assert len(failures) == 2 and "the freezer refused" in failures[0]


def test_zipped_code_and_layer_are_extracted_once_for_every_environment(tmp_path: Path, recorder: Recorder) -> None:
    """Two environments (one after the other) of a function whose code and extension layer are zips: both run from
    the two trees the first one's staging put in the cache (tests/sandbox/test_filesystem.py: nothing is extracted
    twice)."""
    config = make_function(tmp_path, "handler.echo_env", extensions={"e": "ext.py"})
    code_zip = Path(shutil.make_archive(str(tmp_path / "code"), "zip", config.code))
    assert config.layers[0].content.suffix == ".zip"
    config = dataclasses.replace(config, code=code_zip)
    cache = tmp_path / "cache"
    options = Options(cache_dir=cache)
    first = invoke_all(config, [{"keys": ["LAMBDA_TASK_ROOT"]}], recorder, options)
    trees = sorted((cache / "staged").iterdir())
    second = invoke_all(config, [{"keys": ["LAMBDA_TASK_ROOT"]}], recorder, options)
    assert isinstance(first[0].outcome, Response) and isinstance(second[0].outcome, Response)
    assert len(trees) == 2 and sorted((cache / "staged").iterdir()) == trees
    assert len(recorder.extension_says("registered")) == 2  # the layer's extension ran in both
