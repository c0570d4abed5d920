"""examples/secrets-at-cold-start: the extension writes the named secrets under /tmp/secrets during Init, before
the function's init code runs, which reads them at import."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lambdabox.core.model import LambdaFailure, Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult
from lambdabox.template.load import load_template
from support import Recorder, run

EXAMPLE = Path(__file__).parents[2] / "examples" / "secrets-at-cold-start"
LAYER_FILES = EXAMPLE / "layer" / "secrets-at-cold-start"


def invoke(recorder: Recorder, times: int, overrides: dict[str, str] | None = None) -> list[InvokeResult]:
    config = load_template(EXAMPLE / "template.yaml", overrides).function("PaymentsFunction")

    async def go() -> list[InvokeResult]:
        async with open_environment(config, Options(), [recorder]) as env:
            return [await env.invoke(b"{}") for _ in range(times)]

    return run(go())


def test_the_function_reads_the_secrets_at_import_from_its_tmp(recorder: Recorder) -> None:
    names = json.loads((LAYER_FILES / "secrets.json").read_text())["secrets"]
    store = json.loads((LAYER_FILES / "store.json").read_text())
    assert set(store) > set(names)  # the store holds a secret that is not asked for

    results = invoke(recorder, 2)
    answers = [json.loads(r.outcome.body) for r in results if isinstance(r.outcome, Response)]
    assert len(answers) == 2, results
    fingerprints = {name: hashlib.sha256(store[name].encode()).hexdigest()[:12] for name in sorted(names)}
    for answer in answers:  # the warm invoke keeps what the cold start read
        assert answer == {
            "read_at_cold_start": fingerprints,
            "in_tmp": dict.fromkeys(sorted(names), "0o600"),  # only the named ones, readable by their owner only
            "tmp_secrets_mode": "0o700",
        }

    # Written before the function's code ran, within Init; removed at SHUTDOWN.
    lines = [(e.source, str(e.record)) for e in recorder.events if e.type in ("function", "extension")]
    cached = lines.index(("secrets-at-cold-start", f"cached 2 secrets in /tmp/secrets: {', '.join(names)}"))
    read = lines.index(("runtime", f"cold start: read secrets {', '.join(sorted(names))}"))
    assert cached < read
    assert [line for source, line in lines if line.startswith("cold start")] == [lines[read][1]]  # one cold start
    assert recorder.types().index("platform.initReport") < recorder.types().index("platform.start")
    assert lines[-1] == ("secrets-at-cold-start", "SHUTDOWN: removed /tmp/secrets")


def test_a_secret_that_cannot_be_read_fails_init(recorder: Recorder) -> None:
    # One invoke: a second would initialise again after the failed Init, where lambdabox may still charge the old
    # extension's exit (it exits after /init/error, as Lambda asks) to the new Init as Extension.Crash.
    (result,) = invoke(recorder, 1, {"SecretsStore": "/nowhere/store.json"})
    assert isinstance(result.outcome, LambdaFailure), result
    assert result.outcome.error_type == "Extension.SecretsUnavailable"
    assert "/nowhere/store.json" in result.outcome.message
    assert [r["status"] for r in recorder.records("platform.initReport")] == ["error"]
    assert not any(line.startswith("cached") for line in recorder.lines("secrets-at-cold-start"))
