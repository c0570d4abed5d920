"""JSON that others wrote (clients, functions, extensions), parsed so that no input can raise anything but ValueError.
``json`` recurses once per level of nesting and raises RecursionError near Python's limit (about 1,000 levels); and
while it is that deep, a finalizer the garbage collector runs on its allocations fails too (it has no stack left). So
a document that may be that deep (it has more brackets than :data:`MAY_BE_DEEP`) is parsed with the collector off:
counting its brackets is cheap, a scan of its real depth would not be."""

from __future__ import annotations

import gc
import json
from typing import Any

MAY_BE_DEEP = 500
"""Opening brackets beyond which a document may nest deep enough to matter (well under Python's limit)."""


def loads(data: str | bytes) -> Any:
    """``json.loads``; too deep a nesting is a ValueError ("nested too deeply") like any other invalid JSON."""
    brackets = data.count("[") + data.count("{") if isinstance(data, str) else data.count(b"[") + data.count(b"{")
    collecting = brackets > MAY_BE_DEEP and gc.isenabled()
    if collecting:
        gc.disable()  # (no finalizer runs at the bottom of a deep parse; the next collection runs them)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    finally:
        if collecting:
            gc.enable()
