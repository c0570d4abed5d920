"""The server's task group, with no environment behind it: an invoke that fails is the caller's error or, once the
caller has its answer, the operator's report; neither ends the group, and nothing is left running on exit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.model import FunctionConfig, Outcome, Response
from lambdabox.service.server import Server, ServerSettings, open_server
from lambdabox.template.load import Template
from support import make_function, run


def failing_run(server: Server, *, answer_first: bool) -> None:
    """Replace the pool's ``run`` with one that gives its unit back and fails, after the outcome or before it."""
    pool = server.pools["Fn"]

    async def run_and_fail(payload: bytes, *, on_outcome: Any = None, **call: Any) -> Any:
        try:
            await asyncio.sleep(0)
            if answer_first:
                on_outcome(Response(b'"answered"'))
            await asyncio.sleep(0.01)
            raise RuntimeError("failed in flight")
        finally:
            pool.give_back()

    pool.run = run_and_fail  # type: ignore[method-assign]


async def invoke(server: Server, config: FunctionConfig) -> Outcome:
    answer = await server.invoke(config, b"{}", client_context=None, invoked_arn=config.arn, tail=False)
    return answer.outcome


def test_an_invoke_failing_after_its_answer_is_reported_and_the_server_serves_on(tmp_path: Path) -> None:
    config = make_function(tmp_path)
    template = Template(tmp_path / "template.yaml", {"Fn": config})
    reports: list[str] = []
    reported = asyncio.Event()

    def report(text: str) -> None:
        reports.append(text)
        reported.set()

    async def main() -> None:
        settings = ServerSettings(destinations=tmp_path / "destinations.jsonl")
        async with open_server(template, settings=settings, report=report) as server:
            failing_run(server, answer_first=True)
            for _ in range(2):  # the first failure did not end the group: the second invoke is served the same
                assert await invoke(server, config) == Response(b'"answered"')
                async with asyncio.timeout(5):
                    await reported.wait()
                (text,) = reports
                assert text.startswith("lambdabox: Fn: invoke ") and "failed after its outcome" in text
                assert text.endswith("RuntimeError('failed in flight')")
                reports.clear()
                reported.clear()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main(), timeout=15)


def test_an_invoke_failing_before_its_outcome_is_the_callers_error(tmp_path: Path) -> None:
    config = make_function(tmp_path)
    template = Template(tmp_path / "template.yaml", {"Fn": config})
    reports: list[str] = []

    async def main() -> None:
        settings = ServerSettings(destinations=tmp_path / "destinations.jsonl")
        async with open_server(template, settings=settings, report=reports.append) as server:
            failing_run(server, answer_first=False)
            for _ in range(2):
                with pytest.raises(RuntimeError, match="failed in flight"):
                    await invoke(server, config)
            assert server.pools["Fn"].busy == 0
        assert reports == []  # the caller had the error: the operator is not told twice
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main(), timeout=15)
