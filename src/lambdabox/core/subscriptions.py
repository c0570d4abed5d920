"""Which extension subscribed to the Logs or the Telemetry API in the current Init, and Lambda's rules for a new
subscription: a body that validates (400), only during Init (403), one of the two APIs per extension (400), and a
repeat that changes nothing."""

from __future__ import annotations

from lambdabox.core.errors import ApiError
from lambdabox.core.telemetry import API_NAMES, CLOSED, ERROR_TYPE, Subscription, parse


class Subscriptions:
    """The subscriptions of one Init (``clear`` at the next)."""

    def __init__(self) -> None:
        self._apis: dict[str, str] = {}  # extension name -> the one API it subscribed through

    def __bool__(self) -> bool:
        return bool(self._apis)

    def clear(self) -> None:
        self._apis.clear()

    def accept(self, api: str, name: str, body: object, *, during_init: bool) -> Subscription | None:
        """The subscription to carry out, None for a repeat; ApiError where Lambda refuses it."""
        subscription = parse(api, body)
        if not during_init:
            raise ApiError(403, *CLOSED[api])
        used = self._apis.get(name)
        if used == api:
            return None
        if used is not None:
            message = f"extension {name} already subscribed through the {API_NAMES[used]} API; an extension may use"
            raise ApiError(400, ERROR_TYPE[api], f"{message} only one of the Logs and Telemetry APIs")
        self._apis[name] = api
        return subscription
