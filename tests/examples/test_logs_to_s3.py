"""examples/logs-to-s3: the extension stores each Telemetry API batch as an S3 object. Tested against moto's S3
server, started here with signature checking on, so every PUT the extension makes is verified as AWS would."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from lambdabox.core.model import Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult
from lambdabox.sandbox import outbound
from lambdabox.template.load import load_template
from support import Recorder, run

TEMPLATE = Path(__file__).parents[2] / "examples" / "logs-to-s3" / "template.yaml"
BUCKET = "function-logs"
REGION = "us-east-1"
SETUP_CALLS = 4  # create user, access key, policy, bucket: moto checks signatures on every request after these
KEY = re.compile(r"lambda-logs/OrderFunction/\d{4}/\d{2}/\d{2}/([0-9a-f]{12})-(\d{8})\.json")


@dataclass
class MotoS3:
    url: str
    access_key: str
    secret_key: str

    def client(self, secret_key: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
        )


def wait_for_url(process: subprocess.Popen[bytes], seconds: float) -> str:
    """The URL moto prints once it listens (it picked the port), read from its stderr with a deadline."""
    assert process.stderr is not None
    seen = b""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if found := re.search(rb"Running on (http://127\.0\.0\.1:\d+)", seen):
                return found.group(1).decode()
    raise AssertionError(f"moto did not start within {seconds} s: {seen.decode(errors='replace')}")


@pytest.fixture
def moto_s3() -> Iterator[MotoS3]:
    """moto's server on every address of the host (an environment reaches it at host.lambdabox.internal), with an
    IAM user allowed s3:* and the bucket; stopped by PID."""
    # Path-style buckets whatever the host name (moto would read ``host`` of host.lambdabox.internal as a bucket).
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS), "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"}
    command = [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", "0"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) as process:
        drain: threading.Thread | None = None
        try:
            url = wait_for_url(process, 30)
            assert process.stderr is not None
            drain = threading.Thread(target=process.stderr.read, daemon=True)  # its request log must not block it
            drain.start()
            setup = {"endpoint_url": url, "region_name": REGION, "aws_access_key_id": "x", "aws_secret_access_key": "x"}
            iam = boto3.client("iam", **setup)
            iam.create_user(UserName="logs-to-s3")
            key = iam.create_access_key(UserName="logs-to-s3")["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName="logs-to-s3", PolicyName="s3", PolicyDocument=json.dumps(policy))
            moto = MotoS3(url, key["AccessKeyId"], key["SecretAccessKey"])
            moto.client().create_bucket(Bucket=BUCKET)
            yield moto
        finally:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
            if drain is not None:
                drain.join(timeout=10)


def stored_batches(moto: MotoS3) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(instance, sequence, records) of every object in the bucket, in sequence order."""
    s3 = moto.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    batches = []
    for key in keys:
        match = KEY.fullmatch(key)
        assert match, key
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        batches.append((match[1], int(match[2]), json.loads(body)))
    return sorted(batches, key=lambda batch: batch[1])


def test_every_batch_is_an_object_and_nothing_is_lost(
    moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    # The function's credentials, which its extensions get too, are the IAM user's: moto checks the signatures.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    # With its own network namespace and an outbound network (root, slirp4netns), the environment reaches moto's
    # server on this machine's loopback by name, as it would reach S3; elsewhere it runs in the host's network.
    own_network = os.geteuid() == 0 and outbound.probe() is None
    endpoint = moto_s3.url.replace("127.0.0.1", outbound.HOST_NAMES[0]) if own_network else moto_s3.url
    template = load_template(TEMPLATE, {"LogsBucket": BUCKET, "S3Endpoint": endpoint})
    config = template.function("OrderFunction")
    # 1,500 item lines and more: batches hold at most maxItems (1,000), so there are several whatever the timing.
    orders = [{"order": f"A-{n}", "items": [f"item-{n}-{i}" for i in range(500)]} for n in range(3)]

    async def go() -> list[InvokeResult]:
        async with open_environment(config, Options(private_network=own_network), [recorder]) as env:
            assert (env.netns is not None) == own_network, env.degraded
            return [await env.invoke(json.dumps(order).encode()) for order in orders]

    results = run(go())  # leaving the environment delivers SHUTDOWN: the last records are flushed before it
    assert all(isinstance(r.outcome, Response) for r in results), results

    batches = stored_batches(moto_s3)
    assert len({instance for instance, _, _ in batches}) == 1  # one environment
    assert [sequence for _, sequence, _ in batches] == list(range(1, len(batches) + 1))  # no upload failed
    assert len(batches) >= 2 and all(0 < len(records) <= 1000 for _, _, records in batches)
    stored = [record for _, _, records in batches for record in records]

    # Every function line, once, in order, from the cold start's to the last invoke's.
    lines = [r["record"] for r in stored if r["type"] == "function"]
    assert lines == recorder.lines("runtime")
    assert lines[0] == "cold start: order handler loaded"
    for result, order in zip(results, orders, strict=True):
        assert f"request {result.request_id}: order {order['order']} done, {len(order['items'])} items" in lines

    # Every platform event, in order, including the last invoke's report, delivered just before SHUTDOWN.
    assert [r["type"] for r in stored if r["type"] != "function"] == recorder.types()
    reports = {r["record"]["requestId"]: r["record"] for r in stored if r["type"] == "platform.report"}
    assert list(reports) == [r.request_id for r in results]
    for result in results:
        metrics = reports[result.request_id]["metrics"]
        assert metrics["durationMs"] == result.report.duration_ms
        assert metrics["maxMemoryUsedMB"] == result.report.max_memory_used_mb

    # The extension's own lines are not subscribed to; its last one counts what it stored.
    extension_lines = recorder.lines("logs-to-s3")
    assert f"SHUTDOWN: {len(stored)} records in {len(batches)} objects" in extension_lines
    assert not any(line.startswith("sending telemetry") for line in lines)


def test_a_wrong_signature_is_refused_by_the_server(moto_s3: MotoS3) -> None:
    """The check the test above relies on: this moto refuses what is not signed with the user's secret."""
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        moto_s3.client(secret_key="not-the-secret").list_objects_v2(Bucket=BUCKET)
