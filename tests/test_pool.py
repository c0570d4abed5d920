"""Environment pools behind the Invoke API: concurrent invokes in concurrent environments (each with its own /tmp),
warm reuse, reserved and account concurrency (429), keep-alive, provisioned concurrency, shutdown of every one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psutil
import pytest
from botocore.exceptions import ClientError

from lambdabox.environment import TelemetryEvent
from server_support import Served, serving, write_template
from support import extension_script, run

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
            first = asyncio.create_task(invoke(served, "Busy", {"seconds": 2}))
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
            first = asyncio.create_task(invoke(served, "Busy", {"seconds": 2}))
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
