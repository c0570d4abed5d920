"""Cold start: from entering ``open_environment`` to the first response of a no-op Python handler.

What is timed, per round: ``open_environment(config)`` is entered (default options: isolation and freeze on),
then the first ``env.invoke(b"{}")`` (which runs Init: spawning the awslambdaric runtime, importing the
handler, the runtime's first /next) returns its response. The environment's shutdown on leaving the block is
not part of the figure (it is printed apart). One untimed round first, then ``--rounds`` timed ones; p50.
The first response is when the outcome is known (``on_outcome``), which is when Lambda would answer.
Each round is split into: setup (staging code, cgroups, mount namespace, API server: entry to the block),
init (Lambda's Init duration as the report gives it) and the rest (first invoke, plus what lies between).
The same cold start is also timed with a holder started ahead (``Options(spares=...)``, as ``start-lambda``'s
server gives its environments: the sandbox holder's process is already running when the environment opens).

The floor, measured in the same run: a bare ``<interpreter> -c "import awslambdaric"`` process, start to
exit, with the same interpreter the runtime uses (``resolve_runtime``: lambdabox's per-version ``lang``
venv around the base python) and the same PYTHONPATH (code dir, /opt dirs, and the per-version runtime
dir where awslambdaric is installed), same count, p50. The target is cold start < 1.5 x that floor.

``import awslambdaric`` only loads the package's ``__init__`` (a version string): that floor is nearly a
bare interpreter start. For reference the script also times ``-c "import awslambdaric.__main__"`` (the
modules the runtime needs before its first /next: bootstrap, the runtime client and its C extension),
which is not the floor of the target.

The machine may be shared: each round runs the floor, the two cold starts and the reference one after the other,
in an order rotating every round, so that load from elsewhere falls on all of them alike.

Run: ``.venv/bin/python bench/cold_start.py`` (``--rounds`` to change the count).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LOOPS, LogTail, ms, run_on

from lambdabox.core.model import FunctionConfig, Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.sandbox.held import open_spares
from lambdabox.sandbox.namespace import files_dir
from lambdabox.sandbox.runtime import resolve_runtime

RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
HANDLER = "def handler(e, c):\n    return None\n"
BUDGET_S = 110.0  # the whole run, so the script always ends by itself
TARGET_RATIO = 1.5


def load() -> str:
    """The machine's load average: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_config(code: Path) -> FunctionConfig:
    code.mkdir(parents=True, exist_ok=True)
    (code / "handler.py").write_text(HANDLER)
    return FunctionConfig(
        logical_id="Bench", function_name="Bench", runtime=RUNTIME, handler="handler.handler", code=code
    )


# ---- the floor -------------------------------------------------------------------------------------------


def floor_command(code: Path, opt: Path) -> tuple[str, dict[str, str]]:
    """The runtime's interpreter and an environment with its PYTHONPATH (host paths for /var/task, /opt)."""
    cmd = resolve_runtime(RUNTIME, task_root=str(code), opt_root=str(opt), wrapper=None, cache_dir=Options().cache_dir)
    interpreter = cmd.argv[0]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "en_US.UTF-8", "TZ": ":UTC"}
    env["PYTHONPATH"] = cmd.env["PYTHONPATH"]
    return interpreter, env


def time_process(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    # No timeout= here: with one, subprocess polls for the exit with growing sleeps, which would inflate the
    # floor (by up to 2x, measured). An interpreter importing a module does not hang; the run stays bounded.
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


# ---- cold starts -----------------------------------------------------------------------------------------


async def one_cold_start(config: FunctionConfig, options: Options | None = None) -> dict[str, float]:
    answered: list[float] = []
    tail = LogTail()
    t0 = time.perf_counter()
    async with open_environment(config, options, [tail]) as env:
        t_open = time.perf_counter()
        DEGRADED.update(env.degraded)
        result = await env.invoke(b"{}", on_outcome=lambda _outcome: answered.append(time.perf_counter()))
        t_returned = time.perf_counter()
        if not isinstance(result.outcome, Response) or result.outcome.body != b"null":
            raise tail.failure(result.outcome)
        init_s = (result.report.init_duration_ms or 0.0) / 1000.0
    t_end = time.perf_counter()
    t_first = answered[0]  # the first response: the outcome is known (invoke() returns a little later)
    return {
        "cold": t_first - t0,
        "setup": t_open - t0,
        "init": init_s,
        "rest": t_first - t_open - init_s,
        "returned": t_returned - t_first,
        "shutdown": t_end - t_returned,
    }


async def measure(code: Path, opt: Path, config: FunctionConfig, rounds: int) -> tuple[list[float], ...]:
    """Rounds of (floor, cold start, cold start with a holder started ahead, reference) in rotating order, so that
    load from elsewhere on the machine falls on all alike; the first round is not counted (first use may install
    the runtime client and fills the page cache)."""
    interpreter, env = floor_command(code, opt)
    floor: list[float] = []
    reference: list[float] = []
    colds: list[dict[str, float]] = []
    ahead: list[float] = []

    async def run_floor(into: list[float], statement: str, counted: bool) -> None:
        took = await asyncio.to_thread(time_process, [interpreter, "-c", statement], env, code)
        if counted:
            into.append(took)

    async def run_cold(counted: bool) -> None:
        got = await one_cold_start(config)
        if counted:
            colds.append(got)

    async with open_spares(files_dir) as spares:  # as start-lambda's server has them

        async def run_ahead(counted: bool) -> None:
            got = await one_cold_start(config, Options(spares=spares))
            if counted:
                ahead.append(got["cold"])

        for r in range(rounds + 1):
            steps = [
                lambda c: run_floor(floor, "import awslambdaric", c),
                run_cold,
                run_ahead,
                lambda c: run_floor(reference, "import awslambdaric.__main__", c),
            ]
            for step in steps[r % 4 :] + steps[: r % 4]:
                await step(r > 0)
    return floor, reference, ahead, *(tuple([c[k] for c in colds] for k in COLD_PARTS))


DEGRADED: set[str] = set()  # what the environments said differs from Lambda (no cgroups, no namespace...)
COLD_PARTS = ("cold", "setup", "init", "rest", "returned", "shutdown")


# ---- main ------------------------------------------------------------------------------------------------


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


async def main(rounds: int) -> None:
    print(f"cold start: {rounds} rounds after 1 untimed one, floor/cold/cold ahead/reference interleaved; {RUNTIME}")
    print(f"load average before: {load()}")
    with tempfile.TemporaryDirectory(prefix="lambdabox-bench-") as tmp:
        code, opt = Path(tmp) / "code", Path(tmp) / "opt"
        config = make_config(code)
        opt.mkdir()
        interpreter, env = floor_command(code, opt)
        print(f"runtime interpreter: {interpreter}")
        print(f"PYTHONPATH: {env['PYTHONPATH']}")
        floor, reference, ahead, cold, *parts = await measure(code, opt, config, rounds)
    floor_p50 = p50(floor)
    for note in sorted(DEGRADED):
        print(f"note: degraded isolation: {note}")
    print()
    header = f"{'case':<52} {'p50 ms':>8} {'min ms':>8} {'max ms':>8} {'ratio to floor':>15}"
    print(header)
    print("-" * len(header))
    rows = [
        ('floor: python -c "import awslambdaric"', floor),
        ("cold start: open_environment -> first response", cold),
        ("  the same, a holder started ahead (start-lambda)", ahead),
        ('reference: python -c "import awslambdaric.__main__"', reference),
    ]
    for name, samples in rows:
        print(
            f"{name:<52} {ms(p50(samples)):8.1f} {ms(min(samples)):8.1f} {ms(max(samples)):8.1f} "
            f"{p50(samples) / floor_p50:15.2f}"
        )
    print()
    print("cold start split (p50 of each part, ms):")
    explained = {
        "setup": "open_environment entry -> block entered (staging, cgroups, namespace, API server)",
        "init": "Init duration from the report (spawn runtime -> its first /next)",
        "rest": "the rest, up to the first response (submitting the invoke, the invoke itself)",
        "returned": "not in the figure: first response -> invoke() returned (the runtime's next /next)",
        "shutdown": "not in the figure: leaving the block (shutdown, cleanup)",
    }
    for part, samples in zip(COLD_PARTS[1:], parts, strict=True):
        print(f"  {part:<9} {ms(p50(samples)):7.1f}  {explained[part]}")
    ratio = p50(cold) / floor_p50
    verdict = "met" if ratio < TARGET_RATIO else "MISSED"
    print()
    print(f"target: cold start under {TARGET_RATIO} x the bare awslambdaric start: {ratio:.2f} x, {verdict}")
    print(f"load average after: {load()}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="the event loop (lambdabox runs on uvloop)")
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(BUDGET_S):
            await main(args.rounds)

    run_on(args.loop, bounded())


if __name__ == "__main__":
    run()
