"""The Runtime API over real HTTP, with the test itself playing the runtime (its `bootstrap` only sleeps)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from lambdabox.core.model import FunctionFailure, Response
from lambdabox.environment.report import InvokeResult
from lambdabox.environment.runner import Environment
from support import RUNTIME, playing_runtime, run, sleeping_function

Scenario = Callable[[Environment, aiohttp.ClientSession, str], Awaitable[object]]


def play(tmp_path: Path, scenario: Scenario, extensions: tuple[str, ...] = ()) -> object:
    async def go() -> object:
        async with playing_runtime(sleeping_function(tmp_path, extensions)) as (env, http, base):
            return await scenario(env, http, base)

    return run(go(), timeout=30)


def test_next_carries_the_event_and_lambda_headers(tmp_path: Path) -> None:
    async def scenario(env: Environment, http: aiohttp.ClientSession, base: str) -> object:
        invoking = asyncio.create_task(env.invoke(b'{"k": "v"}', client_context='{"custom": {}}'))
        async with http.get(f"{base}{RUNTIME}/invocation/next") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            request_id = resp.headers["Lambda-Runtime-Aws-Request-Id"]
            deadline = int(resp.headers["Lambda-Runtime-Deadline-Ms"])
            assert abs(deadline / 1000 - (env.now() + 5)) < 1
            assert resp.headers["Lambda-Runtime-Invoked-Function-Arn"].count(":") >= 6
            assert resp.headers["Lambda-Runtime-Trace-Id"].startswith("Root=1-")
            assert resp.headers["Lambda-Runtime-Client-Context"] == '{"custom": {}}'
            assert "Lambda-Runtime-Cognito-Identity" not in resp.headers
            assert await resp.json() == {"k": "v"}
        async with http.post(f"{base}{RUNTIME}/invocation/{request_id}/response", data=b'"done"') as resp:
            assert resp.status == 202 and (await resp.json()) == {"status": "OK"}
        async with http.post(f"{base}{RUNTIME}/invocation/{request_id}/response", data=b"again") as resp:
            assert resp.status == 403  # one response per invoke
            assert (await resp.json())["errorType"] == "InvalidStateTransition"
        next_call = asyncio.create_task(http.get(f"{base}{RUNTIME}/invocation/next"))
        result: InvokeResult = await invoking
        next_call.cancel()
        assert isinstance(result.outcome, Response) and result.outcome.body == b'"done"'
        return None

    play(tmp_path, scenario)


def test_unknown_request_id_and_error_posts(tmp_path: Path) -> None:
    async def scenario(env: Environment, http: aiohttp.ClientSession, base: str) -> object:
        invoking = asyncio.create_task(env.invoke(b"{}"))
        async with http.get(f"{base}{RUNTIME}/invocation/next") as resp:
            request_id = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        async with http.post(f"{base}{RUNTIME}/invocation/not-a-request/response", data=b"{}") as resp:
            assert resp.status == 400
            assert (await resp.json())["errorType"] == "InvalidRequestID"
        error = {"errorMessage": "bad", "errorType": "MyError", "stackTrace": []}
        headers = {"Lambda-Runtime-Function-Error-Type": "Custom.Header"}
        url = f"{base}{RUNTIME}/invocation/{request_id}/error"
        async with http.post(url, json=error, headers=headers) as resp:
            assert resp.status == 202
        next_call = asyncio.create_task(http.get(f"{base}{RUNTIME}/invocation/next"))
        result: InvokeResult = await invoking
        next_call.cancel()
        assert isinstance(result.outcome, FunctionFailure)
        assert result.outcome.error_type == "Custom.Header"  # the header wins over the body
        assert json.loads(result.outcome.body) == error
        return None

    play(tmp_path, scenario)


def test_response_over_6_mb_gets_413(tmp_path: Path) -> None:
    async def scenario(env: Environment, http: aiohttp.ClientSession, base: str) -> object:
        invoking = asyncio.create_task(env.invoke(b"{}"))
        async with http.get(f"{base}{RUNTIME}/invocation/next") as resp:
            request_id = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        url = f"{base}{RUNTIME}/invocation/{request_id}/response"
        async with http.post(url, data=io.BytesIO(b"x" * (6 * 1024 * 1024 + 1))) as resp:
            assert resp.status == 413
            assert (await resp.json())["errorType"] == "RequestEntityTooLarge"
        next_call = asyncio.create_task(http.get(f"{base}{RUNTIME}/invocation/next"))
        result: InvokeResult = await invoking
        next_call.cancel()
        assert isinstance(result.outcome, FunctionFailure)
        assert result.outcome.error_type == "Function.ResponseSizeTooLarge"
        return None

    play(tmp_path, scenario)


def test_init_error_is_returned_to_the_invoke(tmp_path: Path) -> None:
    async def scenario(env: Environment, http: aiohttp.ClientSession, base: str) -> object:
        invoking = asyncio.create_task(env.invoke(b"{}"))
        error = {"errorMessage": "no config", "errorType": "Runtime.ConfigInvalid"}
        headers = {"Lambda-Runtime-Function-Error-Type": "Runtime.ConfigInvalid"}
        async with http.post(f"{base}{RUNTIME}/init/error", json=error, headers=headers) as resp:
            assert resp.status == 202
        result: InvokeResult = await invoking
        assert isinstance(result.outcome, FunctionFailure)
        assert json.loads(result.outcome.body)["errorType"] == "Runtime.ConfigInvalid"
        return None

    play(tmp_path, scenario)


def test_a_state_change_is_refused_before_anything_changes(tmp_path: Path) -> None:
    async def scenario(env: Environment, http: aiohttp.ClientSession, base: str) -> object:
        async with http.post(f"{base}{RUNTIME}/invocation/x/response", data=b"{}") as resp:
            assert resp.status == 403  # no invoke yet: nothing to respond to
        assert env.lifecycle.phase.value == "uninitialized"
        return None

    play(tmp_path, scenario)
