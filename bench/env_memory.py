"""Memory per warm environment: the RSS of lambdabox's server process with 1, 5 and 20 warm environments of a
no-op Python function, beside the same process with no environment.

What is measured: ``open_server`` (default settings: isolation and freeze on; the concurrency limit raised to 64 so
that 20 concurrent invokes are never refused) runs in a process of its own, serving a template with one Python
function whose handler does nothing, unless the event asks it to sleep (``{"sleep": 0.5}``). To get N warm
environments, this script sends N concurrent invokes that sleep 0.5 s (each on its own ``http.client``
connection): an invoke that finds no idle environment starts one, so the pool grows to N (it is checked; if a
sleep ended before the last environment started, the invokes are sent again with a longer sleep). Once every
environment is idle (the pool says so), and a second more, the RSS of the server process (psutil; the runtimes
are other processes and are not in it) is sampled five times, 0.1 s apart: the median.
Steps: no environment, 1, 5, 20, in that order, in one server process.

Figures: the RSS at each step; per extra environment = (RSS with 20 - RSS with 1) / 19 (the target: under 5 MB);
(RSS with 5 - RSS with 1) / 4 and the first environment (RSS with 1 - the floor) are printed too, and the USS
(memory no other process shares) of the server process.

The floor, measured in the same run: the RSS of that same process with the server started (the Invoke API
listening, the pool and queue of the function made) and no environment.

Also given, for information: the environments' own memory, outside lambdabox's process: the runtimes (the
``awslambdaric`` interpreters started through ``python_bootstrap.py``) and any other helper process (there is
none: the namespaces are held by descriptors of the server's own), as RSS, PSS and USS per environment (RSS
counts the shared interpreter pages in every process; PSS shares them out; USS is what one more process costs,
at least).

Memory does not depend on the load on the machine as much as time does, so there is no interleaving here; run the
script twice to see the spread.

Run: ``.venv/bin/python bench/env_memory.py`` (``--steps`` to change the counts; about 15 s).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from invoke_api import FUNCTION, PATH, RUNTIME, Child, budget, lambdabox_server, load, write_template

BUDGET_S = 110.0  # the whole run, so the script always ends by itself
MAX_CONCURRENCY = 64
TARGET_MB = 5.0
MIB = 1024 * 1024
MB = 1_000_000
SETTLE_S = 1.0  # after every environment is idle, before sampling
SAMPLES = 5

SLEEPY_HANDLER = """\
import time


def handler(event, context):
    if isinstance(event, dict) and event.get("sleep"):
        time.sleep(event["sleep"])
    return None
"""


def invoke_concurrently(url: str, count: int, sleep_s: float) -> None:
    """``count`` invokes at once, each on its own connection; raises if any did not answer 200."""
    address = urlsplit(url)
    body = json.dumps({"sleep": sleep_s}).encode()
    failures: list[str] = []

    def one() -> None:
        conn = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=60)
        try:
            conn.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200 or data != b"null":
                failures.append(f"{response.status} {data[:200]!r}")
        except OSError as error:
            failures.append(repr(error))
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {count} invokes failed, e.g. {failures[0]}")


def pool(server: Child) -> dict[str, Any]:
    return dict(server.ask("stats")["pools"][FUNCTION])


def wait_idle(server: Child, within_s: float = 20.0) -> dict[str, Any]:
    """The pool's counts once every environment is idle (the invoke phases over, the freezes done)."""
    deadline = time.monotonic() + within_s
    while True:
        counts = pool(server)
        if counts["busy"] == 0 and counts["idle"] == counts["environments"]:
            return counts
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not settle: {counts}")
        time.sleep(0.05)


def warm_up_to(server: Child, count: int) -> int:
    """Grow the pool to ``count`` warm environments; returns how many it holds."""
    sleep_s = 0.5
    for _ in range(3):
        have = wait_idle(server)["environments"]
        if have >= count:
            return int(have)
        invoke_concurrently(server.info["url"], count, sleep_s)
        sleep_s *= 2  # the sleep ended before the last environment had started: overlap them longer
    return int(wait_idle(server)["environments"])


def rss_sample(pid: int) -> tuple[int, int]:
    """The median RSS and USS of the process over a few samples."""
    rss, uss = [], []
    for _ in range(SAMPLES):
        info = psutil.Process(pid).memory_full_info()
        rss.append(info.rss)
        uss.append(info.uss)
        time.sleep(0.1)
    return int(statistics.median(rss)), int(statistics.median(uss))


def environments_memory(pid: int) -> dict[str, list[int]]:
    """RSS, PSS and USS of the server's descendants, as runtimes and other helpers."""
    found: dict[str, list[int]] = {"runtimes": [0, 0, 0, 0], "helpers": [0, 0, 0, 0]}  # count, rss, pss, uss
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(proc.cmdline())
            kind = "runtimes" if "python_bootstrap" in command or "awslambdaric" in command else "helpers"
            info = proc.memory_full_info()
            row = found[kind]
            row[0] += 1
            row[1] += info.rss
            row[2] += info.pss
            row[3] += info.uss
    return found


def mib(value: float) -> float:
    return value / MIB


def main(steps: list[int]) -> None:
    print(f"memory per warm environment: steps {', '.join(map(str, steps))} environments; {RUNTIME}")
    print(f"load average before: {load()}")
    rows: list[tuple[str, int, int, int, dict[str, list[int]]]] = []
    with tempfile.TemporaryDirectory(prefix="lambdabox-bench-") as tmp_name:
        tmp = Path(tmp_name)
        template = write_template(tmp, SLEEPY_HANDLER)
        with lambdabox_server(template, tmp, MAX_CONCURRENCY) as server:
            pid = int(server.info["pid"])
            print(f"lambdabox server process: {pid}")
            time.sleep(SETTLE_S)
            rss, uss = rss_sample(pid)
            rows.append(("floor: server started, no environment", 0, rss, uss, environments_memory(pid)))
            for count in steps:
                have = warm_up_to(server, count)
                if have != count:
                    raise RuntimeError(f"wanted {count} warm environments, the pool holds {have}")
                time.sleep(SETTLE_S)
                rss, uss = rss_sample(pid)
                rows.append((f"{count} warm environment{'s' if count > 1 else ''}", count, rss, uss,
                             environments_memory(pid)))  # fmt: skip
            reports = server.ask("stats")["reports"]
    for line in sorted(set(reports)):
        print(f"note: lambdabox said: {line}")
    report(rows)


def report(rows: list[tuple[str, int, int, int, dict[str, list[int]]]]) -> None:
    floor = rows[0][2]
    print()
    print("lambdabox's server process (the runtimes are not in it), MiB:")
    header = f"{'state':<40} {'envs':>4} {'RSS':>8} {'over floor':>10} {'USS':>8}"
    print(header)
    print("-" * len(header))
    for name, count, rss, uss, _ in rows:
        print(f"{name:<40} {count:>4} {mib(rss):8.1f} {mib(rss - floor):10.1f} {mib(uss):8.1f}")
    print()
    by_count = {count: (rss, uss) for _, count, rss, uss, _ in rows}
    first, last = min(c for c in by_count if c > 0), max(by_count)
    per_env = (by_count[last][0] - by_count[first][0]) / (last - first)
    per_env_uss = (by_count[last][1] - by_count[first][1]) / (last - first)
    print(
        f"per extra environment, RSS ({last} - {first}) / {last - first}: {mib(per_env):.2f} MiB "
        f"({per_env / MB:.2f} MB); USS: {mib(per_env_uss):.2f} MiB"
    )
    for count in sorted(by_count):
        if first < count < last:
            step = (by_count[count][0] - by_count[first][0]) / (count - first)
            print(f"per extra environment, RSS ({count} - {first}) / {count - first}: {mib(step):.2f} MiB")
    print(f"the first environment (RSS with {first} - floor): {mib(by_count[first][0] - floor):.2f} MiB")
    print()
    print("the environments' own processes (not lambdabox's memory; for information), MiB:")
    header = (
        f"{'envs':>4} | {'runtimes':>8} {'RSS':>7} {'PSS':>7} {'USS':>7} {'RSS/env':>7} {'PSS/env':>7} | "
        f"{'helpers':>7} {'RSS':>7} {'PSS':>7}"
    )
    print(header)
    print("-" * len(header))
    for _, count, _, _, procs in rows:
        n, rss, pss, uss = procs["runtimes"]
        hn, hrss, hpss, _ = procs["helpers"]
        per = max(count, 1)
        print(
            f"{count:>4} | {n:>8} {mib(rss):7.1f} {mib(pss):7.1f} {mib(uss):7.1f} {mib(rss / per):7.1f} "
            f"{mib(pss / per):7.1f} | {hn:>7} {mib(hrss):7.1f} {mib(hpss):7.1f}"
        )
    print()
    verdict = "met" if per_env < TARGET_MB * MB else "MISSED"
    print(
        f"target: lambdabox's own memory per extra warm environment under {TARGET_MB:.0f} MB: "
        f"{per_env / MB:.2f} MB, {verdict}"
    )
    print(f"load average after: {load()}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    args = parser.parse_args()
    if sorted(args.steps) != args.steps or args.steps[0] < 1:
        sys.exit("--steps: increasing counts, from 1")
    with budget(BUDGET_S):
        main(args.steps)


if __name__ == "__main__":
    run()
