"""JSON that others wrote (clients, functions, extensions), parsed so that no input can raise anything but
ValueError: nesting deeper than Python's recursion limit (about 1,000 levels) raises RecursionError in ``json``."""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes) -> Any:
    """``json.loads``; too deep a nesting is a ValueError ("nested too deeply") like any other invalid JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
