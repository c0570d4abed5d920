"""Environment pools behind the Invoke API: concurrent invokes in concurrent environments (each with its own /tmp),
warm reuse, reserved and account concurrency (429), keep-alive, provisioned concurrency, shutdown of every one."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from botocore.exceptions import ClientError

from lambdabox.core import facts as mark
from lambdabox.core.batching import Backoff
from lambdabox.core.model import LambdaFailure, LayerConfig, Response
from lambdabox.environment.options import Options
from lambdabox.environment.report import TelemetryEvent
from lambdabox.loop import open_task_group
from lambdabox.observe.timeline import Timeline
from lambdabox.service.pool import Capacity, Pool, Ran
from server_support import Events, Served, serving, write_template
from support import extension_script, make_function, run

T = TypeVar("T")

OCCUPY = """
Busy:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.occupy}
"""


async def invoke(served: Served, name: str, event: Any = None, **call: Any) -> dict[str, Any]:
    response = await asyncio.to_thread(
        served.client().invoke, FunctionName=name, Payload=json.dumps(event or {}).encode(), **call
    )
    assert "FunctionError" not in response, response["Payload"].read()
    answer: dict[str, Any] = json.loads(response["Payload"].read())
    return answer


def started(request_count: int) -> Any:
    """A match for the moment ``request_count`` invokes have started."""
    seen: list[TelemetryEvent] = []

    def match(event: TelemetryEvent) -> bool:
        if event.type == "platform.start":
            seen.append(event)
        return len(seen) >= request_count

    return match


def test_parallel_invokes_run_together_in_environments_of_their_own(tmp_path: Path) -> None:
    count = 4

    async def main() -> None:
        async with serving(write_template(tmp_path, OCCUPY)) as served:
            answers = await asyncio.gather(*(invoke(served, "Busy", {"seconds": 1.5}) for _ in range(count)))
            assert max(a["started"] for a in answers) < min(a["ended"] for a in answers)  # all ran at the same time
            assert len({a["environment"] for a in answers}) == count
            if not any("degraded mode" in line for line in served.reports):  # else /tmp is the host's
                assert all(a["others_in_tmp"] == [] for a in answers)  # each /tmp is private to its environment
            pool = served.server.pools["Busy"]
            async with asyncio.timeout(10):  # the answers go out before the invoke phases end
                await pool.wait_quiet()
            assert pool.environments == count and pool.idle == count and pool.busy == 0
            again = await asyncio.gather(*(invoke(served, "Busy", {"seconds": 0.5}) for _ in range(count)))
            assert {a["environment"] for a in again} == {a["environment"] for a in answers}  # warm, reused
            assert served.events.count("platform.initStart") == count

    run(main())


def test_the_most_recently_used_environment_is_reused_first(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, OCCUPY)) as served:
            short, long = await asyncio.gather(
                invoke(served, "Busy", {"seconds": 0.2}), invoke(served, "Busy", {"seconds": 1.2})
            )
            assert short["environment"] != long["environment"]
            async with asyncio.timeout(10):  # both environments back in the pool, the long one last
                await served.server.pools["Busy"].wait_quiet()
            for _ in range(3):
                assert (await invoke(served, "Busy", {"seconds": 0}))["environment"] == long["environment"]
                async with asyncio.timeout(10):
                    await served.server.pools["Busy"].wait_quiet()

    run(main())


def test_reserved_concurrency_throttles_with_lambdas_reason(tmp_path: Path) -> None:
    template = write_template(tmp_path, OCCUPY.replace("occupy}", "occupy, ReservedConcurrentExecutions: 1}"))

    async def main() -> None:
        async with serving(template) as served:
            async with open_task_group() as group:
                first = group.create_task(invoke(served, "Busy", {"seconds": 2}))
                await served.events.wait_for(started(1))
                with pytest.raises(ClientError) as raised:
                    await invoke(served, "Busy", {"seconds": 0})
                response = raised.value.response
                assert response["Error"]["Code"] == "TooManyRequestsException"
                assert response["ResponseMetadata"]["HTTPStatusCode"] == 429
                assert response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
                assert response["Error"]["Message"] == "Rate Exceeded."
                await first
            assert (await invoke(served, "Busy", {"seconds": 0}))["others_in_tmp"] == []  # free again

    run(main())


def test_the_account_limit_throttles_across_functions(tmp_path: Path) -> None:
    template = write_template(tmp_path, OCCUPY + OCCUPY.replace("Busy", "Other"))

    async def main() -> None:
        async with serving(template, max_concurrency=1) as served:
            async with open_task_group() as group:
                first = group.create_task(invoke(served, "Busy", {"seconds": 2}))
                await served.events.wait_for(started(1))
                with pytest.raises(ClientError) as raised:
                    await invoke(served, "Other", {"seconds": 0})
                assert raised.value.response["Reason"] == "ConcurrentInvocationLimitExceeded"
                await first
            await invoke(served, "Other", {"seconds": 0})

    run(main())


def shutdowns(served: Served) -> list[dict[str, Any]]:
    return [item for item in served.events.extension_says("event") if item["event"]["eventType"] == "SHUTDOWN"]


def test_idle_environments_are_shut_down_after_the_keep_alive(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, OCCUPY, extension=True), keep_alive_s=0.5) as served:
            await invoke(served, "Busy", {"seconds": 0})
            await served.events.wait_for(lambda e: '"shutdownReason": "spindown"' in str(e.record), within_s=15)
            await served.events.wait_for(lambda e: '"what": "exiting"' in str(e.record))
            assert served.server.pools["Busy"].environments == 0
            await invoke(served, "Busy", {"seconds": 0})
            assert served.events.count("platform.initStart") == 2  # a cold start again

    run(main())


PROVISIONED = """
Busy:
  Type: AWS::Serverless::Function
  Properties:
    Handler: invoke_handler.occupy
    ProvisionedConcurrencyConfig: {ProvisionedConcurrentExecutions: 2}
Echo:
  Type: AWS::Serverless::Function
  Properties:
    Handler: invoke_handler.context
    ProvisionedConcurrencyConfig: {ProvisionedConcurrentExecutions: 1}
"""


def test_provisioned_concurrency_starts_environments_ahead(tmp_path: Path) -> None:
    template = write_template(tmp_path, PROVISIONED)

    async def main() -> None:
        async with serving(template) as served:
            inits = served.events.records("platform.initStart")
            assert [i["initializationType"] for i in inits] == ["provisioned-concurrency"] * 3
            assert served.events.count("platform.initReport") == 3  # initialised before the first invoke
            assert served.server.pools["Busy"].environments == 2
            answer = await invoke(served, "Echo")
            assert answer["initialization_type"] == "provisioned-concurrency"
            answers = await asyncio.gather(*(invoke(served, "Busy", {"seconds": 1}) for _ in range(3)))
            assert len({a["environment"] for a in answers}) == 3  # two provisioned, one more on demand
            types = [i["initializationType"] for i in served.events.records("platform.initStart")]
            assert types == ["provisioned-concurrency"] * 3 + ["on-demand"]

    run(main())


def test_every_environment_gets_shutdown_on_exit_and_nothing_is_left(tmp_path: Path) -> None:
    async def main() -> Served:
        async with serving(write_template(tmp_path, OCCUPY, extension=True)) as served:
            await asyncio.gather(*(invoke(served, "Busy", {"seconds": 1}) for _ in range(3)))
            assert served.server.pools["Busy"].environments == 3
            assert shutdowns(served) == []
        return served

    served = run(main())
    reasons = [item["event"]["shutdownReason"].lower() for item in shutdowns(served)]
    assert reasons == ["spindown"] * 3
    assert psutil.Process().children(recursive=True) == []


PORTS = """
Ask:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.ask_extension, Layers: [!Ref Porter]}
Porter:
  Type: AWS::Serverless::LayerVersion
  Properties: {ContentUri: porter/}
"""


def test_extensions_in_concurrent_environments_listen_on_the_same_port(tmp_path: Path) -> None:
    extensions = tmp_path / "porter" / "extensions"
    extensions.mkdir(parents=True)
    (extensions / "porter").write_bytes(extension_script("port_ext.py"))
    (extensions / "porter").chmod(0o755)

    async def main() -> None:
        async with serving(write_template(tmp_path, PORTS)) as served:
            answers = await asyncio.gather(*(invoke(served, "Ask", {"seconds": 1}) for _ in range(3)))
            if any("degraded mode" in line for line in served.reports):
                pytest.skip("no network namespace per environment here: " + "; ".join(served.reports))
            ports = served.events.extension_says("port")
            assert [p["bound"] for p in ports] == [True] * 3, ports  # 4243 in each environment's own loopback
            assert len({a["environment"] for a in answers}) == 3
            assert {a["extension_pid"] for a in answers} == {p["pid"] for p in ports}  # each reached its own

    run(main())


# ---- provisioned concurrency holds its count: a pool on its own, with its problems and backoff at hand ----


class Problems:
    """What a pool reports through ``on_problem``, each with the loop's time; ``wait_for`` waits for a count."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, text: str) -> None:
        self.seen.append((asyncio.get_running_loop().time(), text))
        self._changed.set()

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.seen]

    async def wait_for(self, count: int, within_s: float = 30) -> None:
        async with asyncio.timeout(within_s):
            while len(self.seen) < count:
                self._changed.clear()
                await self._changed.wait()


async def run_once(pool: Pool, event: Any) -> Ran:
    pool.reserve()
    return await pool.run(json.dumps(event).encode(), request_id=str(uuid.uuid4()))


def run_owned(main: Callable[[asyncio.TaskGroup], Awaitable[T]]) -> T:
    """Run ``main`` with a task group to own the pool it makes."""

    async def owned() -> T:
        async with open_task_group() as group:
            return await main(group)

    return run(owned())


def nothing_left_running() -> None:
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert psutil.Process().children(recursive=True) == []


def test_a_provisioned_environment_that_crashes_is_replaced_initialised_ahead(tmp_path: Path) -> None:
    config = dataclasses.replace(make_function(tmp_path, "handler.tmp_write"), provisioned_concurrency=2)

    async def main(group: asyncio.TaskGroup) -> None:
        events, problems = Events(), Problems()
        pool = Pool(config, Capacity(10), group, observers=[events], on_problem=problems)
        try:
            await pool.start()
            assert pool.provisioned_idle == 2 and problems.seen == []
            crashed = await run_once(pool, {"crash": True})  # writes /tmp/lambdabox-test-file, then exits
            outcome = crashed.result.outcome
            assert isinstance(outcome, LambdaFailure) and outcome.error_type == "Runtime.ExitError"
            async with asyncio.timeout(20):
                await pool.wait_provisioned()
            assert pool.provisioned_idle == pool.idle == pool.environments == 2
            assert problems.texts == [
                "lambdabox: Fn: a provisioned environment was lost: Runtime.ExitError; another starts now"
            ]
            inits = events.records("platform.initStart")
            assert [i["initializationType"] for i in inits] == ["provisioned-concurrency"] * 3
            assert [r["status"] for r in events.records("platform.initReport")] == ["success"] * 3

            ran = await run_once(pool, {})
            assert isinstance(ran.result.outcome, Response)
            assert ran.result.report.init_duration_ms is None
            assert "initDurationMs" not in events.records("platform.report")[-1]["metrics"]
            assert events.count("platform.initStart") == 3  # no Init during the invoke: initialised ahead
        finally:
            await pool.close()
        nothing_left_running()

    run_owned(main)


def test_an_idle_provisioned_environment_whose_runtime_dies_is_replaced(tmp_path: Path) -> None:
    config = dataclasses.replace(make_function(tmp_path, "handler.ok"), provisioned_concurrency=1)

    async def main(group: asyncio.TaskGroup) -> None:
        events, problems = Events(), Problems()
        unfrozen = Options(freeze=False)  # a frozen process cannot die between invokes (cgroup v1 holds SIGKILL)
        pool = Pool(config, Capacity(10), group, options=unfrozen, observers=[events], on_problem=problems)
        try:
            await pool.start()
            processes = psutil.Process().children(recursive=True)
            runtime = next(p for p in processes if any("python_bootstrap" in part for part in p.cmdline()))
            runtime.kill()  # between invokes: the environment is reset, its Init lost
            await events.wait_for(lambda e: e.type == mark.SHUTDOWN_START and e.record["reset"])
            async with asyncio.timeout(20):
                await pool.wait_provisioned()
            assert pool.provisioned_idle == pool.environments == 1
            assert problems.texts == [
                "lambdabox: Fn: a provisioned environment was lost: the runtime exited: signal: killed; "
                "another starts now"
            ]
            ran = await run_once(pool, {})
            assert isinstance(ran.result.outcome, Response)
            inits = events.records("platform.initStart")
            assert [i["initializationType"] for i in inits] == ["provisioned-concurrency"] * 2  # none in the invoke
        finally:
            await pool.close()
        nothing_left_running()

    run_owned(main)


def test_a_provisioned_function_whose_init_always_fails_retries_with_backoff(tmp_path: Path) -> None:
    config = dataclasses.replace(make_function(tmp_path, "init_error.handler"), provisioned_concurrency=1)
    backoff = Backoff(first_s=0.05, cap_s=0.2)

    async def main(group: asyncio.TaskGroup) -> None:
        events, problems = Events(), Problems()
        pool = Pool(config, Capacity(10), group, observers=[events], on_problem=problems, provisioned_backoff=backoff)
        try:
            await pool.start()  # returns once the first attempt has failed
            assert len(problems.seen) == 1
            await problems.wait_for(4)
        finally:
            async with asyncio.timeout(10):
                await pool.close()
        nothing_left_running()
        delays = [0.05, 0.1, 0.2, 0.2]
        assert problems.texts[:4] == [
            "lambdabox: Fn: a provisioned environment did not start: Init failed: RuntimeError; "
            f"another starts in {delay:g} s"
            for delay in delays
        ]
        times = [at for at, _ in problems.seen]
        assert all(later - earlier >= delay for earlier, later, delay in zip(times, times[1:4], delays, strict=False))
        assert pool.environments == 0 and pool.idle == 0
        attempts = events.records("platform.initStart")
        assert {a["initializationType"] for a in attempts} == {"provisioned-concurrency"}
        assert len(problems.seen) <= len(attempts) <= len(problems.seen) + 1  # each failure reported; one at a time

    run_owned(main)


def test_close_cancels_a_replacement_that_is_not_due_yet(tmp_path: Path) -> None:
    config = dataclasses.replace(make_function(tmp_path, "init_error.handler"), provisioned_concurrency=1)

    async def main(group: asyncio.TaskGroup) -> None:
        events, problems = Events(), Problems()
        not_soon = Backoff(first_s=600, cap_s=600)
        pool = Pool(config, Capacity(10), group, observers=[events], on_problem=problems, provisioned_backoff=not_soon)
        await pool.start()
        assert problems.texts == [
            "lambdabox: Fn: a provisioned environment did not start: Init failed: RuntimeError; another starts in 600 s"
        ]
        async with asyncio.timeout(10):  # far less than the 600 s the replacement would wait
            await pool.close()
        nothing_left_running()
        assert events.count("platform.initStart") == 1 and len(problems.seen) == 1

    run_owned(main)


def test_each_environment_gets_observers_of_its_own(tmp_path: Path) -> None:
    config = make_function(tmp_path, "handler.sleep")
    timelines: list[Timeline] = []

    def own() -> list[Timeline]:
        timelines.append(Timeline(f"environment {len(timelines) + 1}"))
        return [timelines[-1]]

    async def main(group: asyncio.TaskGroup) -> list[Ran]:
        pool = Pool(config, Capacity(10), group, environment_observers=own)
        try:
            return list(await asyncio.gather(run_once(pool, {"seconds": 0.5}), run_once(pool, {"seconds": 0.5})))
        finally:
            await pool.close()

    ran = run_owned(main)
    assert len(timelines) == 2  # two invokes at once: two environments, a timeline each
    seen = []
    for timeline in timelines:
        assert [s.phase for s in timeline.sections] == ["init", "invoke", "shutdown"]
        assert {s.environment for s in timeline.sections} == {timeline.environment}
        seen.append(timeline.sections[1].request_id)
    assert sorted(seen) == sorted(r.result.request_id for r in ran)  # each invoke in its own environment's timeline


def test_a_serial_caller_is_never_throttled_and_keeps_one_environment(tmp_path: Path) -> None:
    """Reserved concurrency 1 and an extension: a caller's next invoke can arrive before the runtime and the
    extension have asked for the next event (which ends the last invoke); it waits for that instead of a 429, so
    1,000 invokes one after another are all served, by the one environment (issue 11: 129 of 1,000 got 429)."""
    template = write_template(
        tmp_path, "Fn:\n  Type: AWS::Serverless::Function\n  Properties: {Handler: handler.ok, "
        "ReservedConcurrentExecutions: 1}\n", extension=True,
    )  # fmt: skip

    async def main() -> None:
        async with serving(template) as served:
            client = served.client()
            for _ in range(1_000):
                response = await asyncio.to_thread(client.invoke, FunctionName="Fn")
                assert response["StatusCode"] == 200 and "FunctionError" not in response
                assert json.loads(response["Payload"].read())["ok"]
            assert served.events.count("platform.initStart") == 1

    run(main(), timeout=120)


def test_an_extension_working_on_after_the_answer_still_holds_its_environment(tmp_path: Path) -> None:
    """As on Lambda: with reserved concurrency 1 and an extension that works 2 s after each INVOKE, the next invoke
    right after the answer is throttled (once the short wait for a finishing invoke is over)."""
    template = write_template(
        tmp_path, "Fn:\n  Type: AWS::Serverless::Function\n  Properties: {Handler: handler.ok, "
        "ReservedConcurrentExecutions: 1, Environment: {Variables: {EXT_POST_INVOKE_S: '2'}}}\n", extension=True,
    )  # fmt: skip

    async def main() -> None:
        async with serving(template) as served:
            client = served.client()
            first = await asyncio.to_thread(client.invoke, FunctionName="Fn")
            assert first["StatusCode"] == 200 and json.loads(first["Payload"].read())["ok"]  # (read: the socket freed)
            with pytest.raises(ClientError) as raised:
                await asyncio.to_thread(client.invoke, FunctionName="Fn")
            assert raised.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"

    run(main(), timeout=120)


OPT_READER = "def handler(event, context):\n    return open('/opt/' + event['name']).read()\n"


def opt_reading_function(tmp_path: Path) -> tuple[Any, Path]:
    """A function whose handler returns a file of its layer, a directory (copied into /opt at each staging)."""
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "data.txt").write_text("v1")
    config = make_function(tmp_path, "opt_reader.handler", layers=(LayerConfig("data", layer),))
    (config.code / "opt_reader.py").write_text(OPT_READER)
    return config, layer


def test_an_environment_opened_ahead_serves_the_cold_start_and_its_init_is_the_invokes(tmp_path: Path) -> None:
    config, _ = opt_reading_function(tmp_path)

    async def main(group: asyncio.TaskGroup) -> None:
        events = Events()
        pool = Pool(config, Capacity(10), group, observers=[events], ahead=True)
        try:
            await pool.start()
            assert pool._ahead is not None
            ahead, _ = pool._ahead
            await ahead.environment()  # opened before any invoke, and no process started in it
            assert events.count("platform.initStart") == 0 and pool.environments == 0
            ran = await run_once(pool, {"name": "data.txt"})
            assert ran.result.outcome == Response(b'"v1"')
            assert ran.result.report.init_duration_ms is not None  # its Init ran at the invoke, as in Lambda
            assert events.count("platform.initStart") == 1
            assert pool.environments == 1 and pool._ahead is None  # the one opened ahead was taken
            assert pool._ahead_refill is not None  # and the next is opened a moment later
        finally:
            await pool.close()
        nothing_left_running()

    run_owned(main)


def test_an_environment_opened_ahead_of_a_change_to_a_layer_is_not_used(tmp_path: Path) -> None:
    config, layer = opt_reading_function(tmp_path)

    async def main(group: asyncio.TaskGroup) -> None:
        pool = Pool(config, Capacity(10), group, ahead=True)
        try:
            await pool.start()
            assert pool._ahead is not None
            await pool._ahead[0].environment()  # staged with v1
            (layer / "data.txt").write_text("v2")
            stat = (layer / "data.txt").stat()
            os.utime(layer / "data.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # (coarse clocks)
            ran = await run_once(pool, {"name": "data.txt"})
            assert ran.result.outcome == Response(b'"v2"')  # a new environment, staged from the layer as it is now
            assert pool.environments == 1  # the stale one was shut down
        finally:
            await pool.close()
        nothing_left_running()

    run_owned(main)


def test_a_pool_closed_with_an_environment_opened_ahead_leaves_nothing(tmp_path: Path) -> None:
    config, _ = opt_reading_function(tmp_path)

    async def main(group: asyncio.TaskGroup) -> None:
        pool = Pool(config, Capacity(10), group, ahead=True)
        await pool.start()
        assert pool._ahead is not None
        await pool._ahead[0].environment()
        await pool.close()
        nothing_left_running()

    run_owned(main)
