"""The Extensions API over real HTTP, with the test itself playing an extension from /opt/extensions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from lambdabox.environment.report import TelemetryEvent
from lambdabox.environment.runner import Environment
from support import RUNTIME, playing_runtime, run, sleeping_function

EXTENSION = "/2020-01-01/extension"


class RuntimeDone:
    """An observer: set once the runtime is done with an invoke (platform.runtimeDone)."""

    def __init__(self) -> None:
        self.seen = asyncio.Event()

    def __call__(self, event: TelemetryEvent) -> None:
        if event.type == "platform.runtimeDone":
            self.seen.set()


def test_register_next_and_errors(tmp_path: Path) -> None:
    runtime_done = RuntimeDone()

    async def go() -> None:
        async with playing_runtime(sleeping_function(tmp_path, ("agent",)), [runtime_done]) as (env, http, base):
            await scenario(env, http, base)

    async def scenario(env: Environment, http: aiohttp.ClientSession, base: str) -> None:
        invoking = asyncio.create_task(env.invoke(b"{}"))
        register = f"{base}{EXTENSION}/register"
        async with http.post(register, json={"events": ["INVOKE"]}) as resp:
            assert resp.status == 400  # no Lambda-Extension-Name
            assert (await resp.json())["errorType"] == "Extension.InvalidExtensionName"
        async with http.post(register, data=b"{not json", headers={"Lambda-Extension-Name": "agent"}) as resp:
            assert resp.status == 400 and (await resp.json())["errorType"] == "InvalidRequestFormat"
        async with http.post(register, json={"events": ["BOGUS"]}, headers={"Lambda-Extension-Name": "agent"}) as r:
            assert r.status == 400 and (await r.json())["errorType"] == "Extension.InvalidEventType"
        async with http.post(register, json={"events": []}, headers={"Lambda-Extension-Name": "stranger"}) as r:
            assert r.status == 403  # not a file in /opt/extensions
        headers = {"Lambda-Extension-Name": "agent", "Lambda-Extension-Accept-Feature": "accountId"}
        async with http.post(register, json={"events": ["INVOKE", "SHUTDOWN"]}, headers=headers) as resp:
            assert resp.status == 200
            identifier = resp.headers["Lambda-Extension-Identifier"]
            assert await resp.json() == {
                "functionName": "Fn",
                "functionVersion": "$LATEST",
                "handler": "app.handler",
                "accountId": "123456789012",
            }
        async with http.get(f"{base}{EXTENSION}/event/next", headers={"Lambda-Extension-Identifier": "nope"}) as r:
            assert r.status == 403 and (await r.json())["errorType"] == "Extension.UnknownExtensionIdentifier"
        ident = {"Lambda-Extension-Identifier": identifier}
        async with http.post(f"{base}{EXTENSION}/exit/error", headers=ident) as resp:
            assert resp.status == 400  # Lambda-Extension-Function-Error-Type is required
        # the extension waits for its event; the runtime (the test) starts init's end with its own /next
        extension_next = asyncio.create_task(http.get(f"{base}{EXTENSION}/event/next", headers=ident))
        async with http.get(f"{base}{RUNTIME}/invocation/next") as resp:
            request_id = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        async with await extension_next as resp:
            assert resp.status == 200
            assert resp.headers["Lambda-Extension-Identifier"] == identifier
            event = await resp.json()
        assert event["eventType"] == "INVOKE" and event["requestId"] == request_id
        assert set(event) == {"eventType", "deadlineMs", "requestId", "invokedFunctionArn", "tracing"}
        async with http.post(f"{base}{RUNTIME}/invocation/{request_id}/response", data=b"1") as resp:
            assert resp.status == 202
        runtime_next = asyncio.create_task(http.get(f"{base}{RUNTIME}/invocation/next"))
        async with asyncio.timeout(5):
            await runtime_done.seen.wait()  # the runtime has asked for its next event...
        await env.settled()
        assert env.lifecycle.phase.value == "invoke"  # ...but the extension has not: the invoke goes on
        assert not invoking.done()
        extension_next = asyncio.create_task(http.get(f"{base}{EXTENSION}/event/next", headers=ident))
        result = await invoking  # ends only now that the extension asked for its next event too
        assert result.report.status == "success"
        runtime_next.cancel()
        extension_next.cancel()

    run(go(), timeout=30)


def test_too_many_registrations_are_refused(tmp_path: Path) -> None:
    names = tuple(f"e{i}" for i in range(10))

    async def go() -> None:
        async with playing_runtime(sleeping_function(tmp_path, names)) as (env, http, base):
            invoking = asyncio.create_task(env.invoke(b"{}"))
            for name in names:
                headers = {"Lambda-Extension-Name": name}
                async with http.post(f"{base}{EXTENSION}/register", json={"events": []}, headers=headers) as r:
                    assert r.status == 200
            # every external extension registered, so the runtime has started: an internal one may register,
            # but not an 11th
            headers = {"Lambda-Extension-Name": "internal"}
            async with http.post(f"{base}{EXTENSION}/register", json={"events": []}, headers=headers) as r:
                assert (r.status, (await r.json())["errorType"]) == (400, "Extension.TooManyExtensions")
            invoking.cancel()

    run(go(), timeout=30)
