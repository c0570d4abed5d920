"""JSON from others: any nesting is a ValueError at worst; a document that may be deep is parsed with the garbage
collector off and it is on again after (what that prevents, a finalizer failing at the bottom of a deep parse, was
seen once in CI and could not be made to happen on purpose)."""

from __future__ import annotations

import gc
import json

import pytest

from lambdabox.core import jsontext

DEEP = [b"[" * 100_000 + b"]" * 100_000, "{" + '"a":{' * 50_000 + "}" * 50_001]


@pytest.mark.parametrize("document", DEEP)
def test_deep_nesting_is_a_value_error_and_the_collector_is_on_after(document: str | bytes) -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        jsontext.loads(document)
    assert gc.isenabled()


def test_the_collector_is_off_during_a_parse_that_may_be_deep(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda data: seen.append(gc.isenabled()) or real(data))
    jsontext.loads(b"[" * 600 + b"]" * 600)  # more brackets than MAY_BE_DEEP
    jsontext.loads(b"[[1], {}]")
    assert seen == [False, True] and gc.isenabled()


def test_an_ordinary_document_parses_as_json_does() -> None:
    document = json.dumps([{"id": i, "tags": ["a", [i]]} for i in range(1_000)])
    assert jsontext.loads(document) == json.loads(document) == jsontext.loads(document.encode())
    assert jsontext.loads(b"[" * 700 + b"]" * 700) == json.loads(b"[" * 700 + b"]" * 700)
    with pytest.raises(ValueError):
        jsontext.loads(b"{not json")
