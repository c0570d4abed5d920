"""Soak: 10,000 invokes through ``lambdabox start-lambda`` (a process of its own, as users run it), one after another
over one keep-alive connection, for three functions: a no-op handler; the same with a Telemetry API subscriber
extension; and the same with an extension that crashes at every 100th invoke (``Extension.Crash``, a reset, a new
Init). At the start and every 2,500 invokes: lambdabox's resident memory, its open descriptors, its descendant
processes, lambdabox's cgroups on the machine, and the Inits so far. The figure is growth per invoke from the first
sample after warm-up to the last, target 0; the floor is the same figure for the no-op function (what lambdabox's
own allocator and caches do under the same load).

    .venv/bin/python bench/soak.py [--invokes 10000] [--every 2500]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

TEMPLATE = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Globals:
  Function: {{Runtime: {runtime}, CodeUri: code/, Handler: app.handler, Timeout: 10}}
Resources:
  Plain:
    Type: AWS::Serverless::Function
  Subscribed:
    Type: AWS::Serverless::Function
    Properties: {{Layers: [!Ref SubscriberLayer]}}
  Crashing:
    Type: AWS::Serverless::Function
    Properties: {{Layers: [!Ref CrashLayer]}}
  SubscriberLayer:
    Type: AWS::Serverless::LayerVersion
    Properties: {{ContentUri: subscriber/}}
  CrashLayer:
    Type: AWS::Serverless::LayerVersion
    Properties: {{ContentUri: crash/}}
"""
HANDLER = "def handler(event, context):\n    print('one line')\n    return None\n"
# What both extensions begin with: the Extensions API client, and registration for INVOKE and SHUTDOWN.
PRELUDE = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys, threading, urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"]
    def call(path, body=None, headers=None, method="POST"):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(API + path, data=data, headers=headers or {{}}, method=method)
        with urllib.request.urlopen(request) as response:
            return response.headers, response.read()
    headers, _ = call("/2020-01-01/extension/register", {{"events": ["INVOKE", "SHUTDOWN"]}},
                      {{"Lambda-Extension-Name": os.path.basename(sys.argv[0])}})
    ident = headers["Lambda-Extension-Identifier"]
    def next_event():
        _, body = call("/2020-01-01/extension/event/next", None, {{"Lambda-Extension-Identifier": ident}}, "GET")
        return json.loads(body)["eventType"]
    """
)
# Subscribes to the Telemetry API (platform and function records) and takes each batch at once.
SUBSCRIBER = PRELUDE + textwrap.dedent(
    """\
    class Listener(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("0.0.0.0", 4243), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    call("/2022-07-01/telemetry", {{"schemaVersion": "2022-12-13", "types": ["platform", "function"],
         "buffering": {{"timeoutMs": 25}}, "destination": {{"protocol": "HTTP", "URI": "http://sandbox.localdomain:4243"}}}},
         {{"Lambda-Extension-Identifier": ident}}, "PUT")
    while next_event() != "SHUTDOWN":
        pass
    """
)
# Exits 1 at every 100th INVOKE it is given (the count kept in /tmp, which outlives a reset).
CRASHER = PRELUDE + textwrap.dedent(
    """\
    while next_event() != "SHUTDOWN":
        count = int(open("/tmp/count").read()) + 1 if os.path.exists("/tmp/count") else 1
        open("/tmp/count", "w").write(str(count))
        if count % 100 == 0:
            sys.exit(1)
    """
)


def write_project(root: Path) -> Path:
    python = sys._base_executable  # type: ignore[attr-defined]
    (root / "code").mkdir()
    (root / "code" / "app.py").write_text(HANDLER)
    for layer, name, script in (("subscriber", "subscriber", SUBSCRIBER), ("crash", "crasher", CRASHER)):
        path = root / layer / "extensions" / name
        path.parent.mkdir(parents=True)
        path.write_text(script.format(python=python))
        path.chmod(0o755)
    template = root / "template.yaml"
    template.write_text(TEMPLATE.format(runtime=f"python3.{sys.version_info.minor}"))
    return template


def lambdabox_cgroups() -> int:
    roots = [Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/freezer"), Path("/sys/fs/cgroup/lambdabox")]
    return sum(1 for root in roots if root.is_dir() for p in root.iterdir() if p.name.startswith("lambdabox"))


def sample(process: psutil.Process, inits: int) -> dict[str, float]:
    return {
        "rss_mb": process.memory_info().rss / 2**20,
        "fds": process.num_fds(),
        "children": len(process.children(recursive=True)),
        "cgroups": lambdabox_cgroups(),
        "inits": inits,
    }


def soak(port: int, process: psutil.Process, function: str, invokes: int, every: int) -> list[dict[str, float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    path = f"/2015-03-31/functions/{function}/invocations"
    samples, inits, errors = [], 0, 0
    for done in range(invokes + 1):
        if done % every == 0:
            samples.append(sample(process, inits))
        if done == invokes:
            break
        conn.request("POST", path, body=b"{}", headers={"X-Amz-Log-Type": "Tail"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{function}: {response.status} {body[:300]!r}")
        errors += response.getheader("X-Amz-Function-Error") is not None
        inits += b"Init Duration" in base64.b64decode(response.getheader("X-Amz-Log-Result") or "")
    samples[-1]["errors"] = errors
    conn.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invokes", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=2_500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        template = write_project(Path(root))
        argv = [sys.executable, "-m", "lambdabox", "start-lambda", "-t", str(template), "-p", "0"]
        env = {**os.environ, "LAMBDABOX_LOG_DIR": str(Path(root) / "logs")}
        with subprocess.Popen(
            argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        ) as server:
            assert server.stdout is not None
            line = ""
            while "serving the Lambda Invoke API on " not in line:
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("start-lambda did not start")
            port = int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1].rstrip("/"))
            process = psutil.Process(server.pid)
            print(f"soak: {args.invokes} invokes per function, sampled every {args.every}; lambdabox pid {server.pid}")
            growth = {}
            for function in ("Plain", "Subscribed", "Crashing"):
                soak(port, process, function, 200, 200)  # warm-up: the environment, the caches, the pools
                started = time.perf_counter()
                samples = soak(port, process, function, args.invokes, args.every)
                seconds = time.perf_counter() - started
                print(f"\n{function} ({seconds:.0f} s, {1000 * seconds / args.invokes:.2f} ms per invoke, "
                      f"{samples[-1]['errors']:.0f} function errors):")  # fmt: skip
                print("  invokes   RSS MB   fds  children  cgroups  inits")
                for index, s in enumerate(samples):
                    print(f"  {index * args.every:7d}  {s['rss_mb']:7.1f}  {s['fds']:4.0f}  {s['children']:8.0f}  "
                          f"{s['cgroups']:7.0f}  {s['inits']:5.0f}")  # fmt: skip
                first, last = samples[1] if len(samples) > 2 else samples[0], samples[-1]
                span = args.invokes - (args.every if len(samples) > 2 else 0)
                growth[function] = {k: (last[k] - first[k]) / span for k in ("rss_mb", "fds", "children", "cgroups")}
            print("\ngrowth per invoke, from the sample after the first to the last (target 0):")
            floor = growth["Plain"]
            for function, g in growth.items():
                print(f"  {function:10} RSS {1024 * g['rss_mb']:+8.3f} KB  fds {g['fds']:+.5f}  children "
                      f"{g['children']:+.5f}  cgroups {g['cgroups']:+.5f}   (RSS minus the floor's: "
                      f"{1024 * (g['rss_mb'] - floor['rss_mb']):+.3f} KB)")  # fmt: skip
            server.send_signal(signal.SIGTERM)
            server.wait(60)


if __name__ == "__main__":
    main()
