"""The Logs API ``2020-08-15`` (superseded by the Telemetry API): ``PUT /2020-08-15/logs`` subscribes an extension
to platform, function and extension logs in the older record shapes."""

from __future__ import annotations

import functools

from lambdabox.api.httpserver import Router
from lambdabox.api.ports import EnvironmentPort
from lambdabox.api.telemetry import subscribe
from lambdabox.core.telemetry import LOGS

PATH = "/2020-08-15/logs"


def add_routes(router: Router, port: EnvironmentPort) -> None:
    router.add("PUT", PATH, functools.partial(subscribe, LOGS, port))
