"""How an environment is run: frozen between invokes or not, isolated or not, on a network of its own or the host's,
where runtime clients are cached, its initialization type, and the holders started ahead that it may take."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lambdabox.sandbox.held import Spares


@dataclass(frozen=True)
class Options:
    freeze: bool = True
    isolate: bool = True
    private_network: bool = True  # a network namespace (outbound through slirp4netns); False: the host's network
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "lambdabox")
    initialization_type: str = "on-demand"
    spares: Spares | None = field(default=None, compare=False)  # start-lambda's (lambdabox.sandbox.held.Spares)
