"""Test support for the Invoke API: templates of fixture functions, an in-process server, boto3 and the AWS CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from lambdabox.environment.report import TelemetryEvent
from lambdabox.service.server import Server, ServerSettings, open_server
from lambdabox.template.load import load_template
from support import FIXTURES, PYTHON, Recorder, extension_script

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDLAMBDABOXTEST",
    "AWS_SECRET_ACCESS_KEY": "secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
READ_TIMEOUT_S = 40  # above every fixture function's timeout (and Init's 10 s): no SDK call is cut short and retried


def write_template(tmp_path: Path, resources: str, *, timeout: int = 10, extension: bool = False) -> Path:
    """A SAM template whose functions run tests/fixtures/{handler,invoke_handler}.py; ``resources`` is the YAML
    under ``Resources:``. With ``extension``, every function gets a layer with tests/fixtures/ext.py as ``watcher``."""
    code = tmp_path / "src"
    code.mkdir(exist_ok=True)
    for name in ("handler.py", "invoke_handler.py"):
        shutil.copy(FIXTURES / name, code / name)
    layers = ""
    resources = textwrap.dedent(resources).strip("\n") + "\n"
    if extension:
        ext_dir = tmp_path / "layer" / "extensions"
        ext_dir.mkdir(parents=True, exist_ok=True)
        (ext_dir / "watcher").write_bytes(extension_script("ext.py"))
        (ext_dir / "watcher").chmod(0o755)
        layers = "\n    Layers: [!Ref Watcher]"
        resources += "Watcher:\n  Type: AWS::Serverless::LayerVersion\n  Properties: {ContentUri: layer/}\n"
    body = textwrap.indent(resources, "  ")
    template = tmp_path / "template.yaml"
    template.write_text(
        "Transform: AWS::Serverless-2016-10-31\n"
        "Globals:\n"
        f"  Function:\n    Runtime: {PYTHON}\n    CodeUri: src/\n    Timeout: {timeout}{layers}\n"
        f"Resources:\n{body}\n"
    )
    return template


@dataclass
class Events(Recorder):
    """A Recorder that can be awaited: ``wait_for`` returns the first event matching, waiting (bounded) if need be."""

    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: TelemetryEvent) -> None:
        super().__call__(event)
        self._changed.set()

    async def wait_for(self, match: Callable[[TelemetryEvent], bool], within_s: float = 30) -> TelemetryEvent:
        async with asyncio.timeout(within_s):
            seen = 0
            while True:
                for event in self.events[seen:]:
                    if match(event):
                        return event
                seen = len(self.events)
                self._changed.clear()
                await self._changed.wait()

    def count(self, type_: str) -> int:
        return len(self.records(type_))


@dataclass
class Served:
    server: Server
    events: Events
    reports: list[str]
    clients: list[Any] = field(default_factory=list)  # closed with the server (their sockets not left to the GC)

    def client(self, read_timeout: float = READ_TIMEOUT_S) -> Any:
        self.clients.append(lambda_client(self.server.url, read_timeout))
        return self.clients[-1]

    def destination_records(self) -> list[dict[str, Any]]:
        path = self.server.destinations
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@asynccontextmanager
async def serving(template: Path, **settings: Any) -> AsyncIterator[Served]:
    """The Invoke API for ``template``, in this event loop, on a free loopback port. Blocking clients (boto3) run
    in threads: enough of them that they never starve lambdabox's own ``to_thread`` calls."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32))
    events, reports = Events(), []
    settings.setdefault("destinations", template.parent / "destinations.jsonl")
    config = ServerSettings(**settings)
    async with open_server(load_template(template), settings=config, observers=[events], report=reports.append) as s:
        served = Served(s, events, reports)
        try:
            yield served
        finally:
            for client in served.clients:
                client.close()


def lambda_client(url: str, read_timeout: float = READ_TIMEOUT_S) -> Any:
    """boto3's Lambda client as users make it, pointed at lambdabox; retries off so that no call is retried."""
    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"max_attempts": 0}, read_timeout=read_timeout, max_pool_connections=32),
    )


def aws_cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``aws lambda ...`` (the AWS CLI, unmodified) against lambdabox, with dummy credentials and no retries."""
    env = {**os.environ, **CREDENTIALS, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    env.pop("AWS_PROFILE", None)
    argv = [sys.executable, "-m", "awscli", "lambda", *args, "--endpoint-url", url]
    argv += ["--cli-read-timeout", str(READ_TIMEOUT_S)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)


FUNCTIONS = """
Echo:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.context, FunctionName: echo-fn}
Logs:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.logs}
Many:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.many_lines}
Fail:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.fail}
Crash:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.crash}
Slow:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.sleep, Timeout: 1}
"""
ARN = "arn:aws:lambda:us-east-1:123456789012:function:echo-fn"


TOO_MANY_EXTENSIONS = (
    FUNCTIONS
    + """
Broken:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.ok, Layers: [!Ref Crowd]}
Crowd:
  Type: AWS::Serverless::LayerVersion
  Properties: {ContentUri: crowd/}
"""
)


def crowd_layer(tmp_path: Path) -> None:
    """Eleven extensions: refused when the environment starts (the template itself is fine)."""
    extensions = tmp_path / "crowd" / "extensions"
    extensions.mkdir(parents=True)
    for index in range(11):
        (extensions / f"ext{index}").write_text("#!/bin/sh\nexit 0\n")
        (extensions / f"ext{index}").chmod(0o755)
