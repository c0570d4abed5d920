"""Helpers for the pure core's tests: pick commands of a type out of the batch ``Lifecycle.handle`` returned."""

from __future__ import annotations

from typing import Any, TypeVar

from lambdabox.core.facts import Command, EmitPlatformEvent

T0 = 1_700_000_000.0  # epoch seconds; tests step in binary fractions of a second so every sum is exact
TRACE = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"

C = TypeVar("C")


def of_type(commands: list[Command], kind: type[C]) -> list[C]:
    return [c for c in commands if isinstance(c, kind)]


def one(commands: list[Command], kind: type[C]) -> C:
    found = of_type(commands, kind)
    assert len(found) == 1, f"expected one {kind.__name__}, got {found}"
    return found[0]


def platform(commands: list[Command], type_: str) -> list[dict[str, Any]]:
    """The records of the platform events of this type, in order."""
    return [c.record for c in of_type(commands, EmitPlatformEvent) if c.type == type_]
