"""Churn: environments made, invoked once and torn down, several at a time, on uvloop (lambdabox's loop) and on
asyncio's own loop in the same run: environments per second, failures, and lambdabox's descriptors before and after.
The floor is the same churn's time per environment on the other loop; the figure that matters is that failures are 0
on both (the descriptor race of issue 11 showed here).

    .venv/bin/python bench/churn.py [--environments 300] [--at-once 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from lambdabox.core.model import FunctionConfig, Response
from lambdabox.environment.opening import open_environment

HANDLER = "def handler(event, context):\n    return {'ok': True}\n"


def function(root: Path) -> FunctionConfig:
    code = root / "code"
    code.mkdir(exist_ok=True)
    (code / "app.py").write_text(HANDLER)
    runtime = f"python3.{sys.version_info.minor}"
    return FunctionConfig(logical_id="Churn", function_name="Churn", runtime=runtime, handler="app.handler", code=code)


async def churn(config: FunctionConfig, count: int, at_once: int) -> tuple[float, list[object]]:
    gate = asyncio.Semaphore(at_once)

    async def one() -> object:
        async with gate:
            try:
                async with open_environment(config) as env:
                    return (await env.invoke(b"{}")).outcome
            except Exception as error:
                return error

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - started, outcomes


def measure(
    new_loop: Callable[[], asyncio.AbstractEventLoop], config: FunctionConfig, count: int, at_once: int
) -> dict[str, float]:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(churn(config, 2, 2))  # warm: the runtime's cache, the loop's thread pool
        fds = len(os.listdir("/proc/self/fd"))
        seconds, outcomes = runner.run(churn(config, count, at_once))
        grown = len(os.listdir("/proc/self/fd")) - fds
    failed = [o for o in outcomes if not isinstance(o, Response)]
    for outcome in failed[:3]:
        print(f"    failed: {outcome!r}", file=sys.stderr)
    return {"per_s": count / seconds, "ms_each": 1000 * seconds / count, "failed": len(failed), "fds": grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--environments", type=int, default=300)
    parser.add_argument("--at-once", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    loops = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    with tempfile.TemporaryDirectory() as root:
        config = dataclasses.replace(function(Path(root)))
        print(f"churn: {args.environments} environments, {args.at_once} at a time, {args.rounds} rounds per loop")
        for round_ in range(args.rounds):
            figures = {
                name: measure(new_loop, config, args.environments, args.at_once) for name, new_loop in loops.items()
            }
            uv, std = figures["uvloop"], figures["asyncio"]
            for name, f in figures.items():
                print(
                    f"  round {round_ + 1} {name:8} {f['per_s']:6.1f} environments/s ({f['ms_each']:.1f} ms each), "
                    f"failed {f['failed']:.0f}, descriptors grown {f['fds']:.0f}"
                )
            print(f"  round {round_ + 1} uvloop/asyncio time per environment: {uv['ms_each'] / std['ms_each']:.2f}")


if __name__ == "__main__":
    main()
