"""The plug-in SDK: a new consumer service in a few lines.

    from services.core.events import Validation
    from services.sdk import consumer

    @consumer("slack-notifier", Validation)
    async def notify(svc, event: Validation) -> None:
        if event.decision == "validated":
            svc.log.info("validated", extra={"hypothesis": event.hypothesis_id})

Run it as it is with ``autointerv service --app my_module:notify --config ...``, or register it
under the ``autointerv.services`` entry-point group of your package (``notifier =
"my_pkg.module:notify"``) and ``autointerv service notifier --config ...``: either joins a
running experiment with its own consumer group, the runtime's commit-after-processing, dead letters,
metrics and health, like every built-in service.  Return events from the handler (or call
``await svc.emit(event)``) to publish them, and name their types in ``produces=``.  Effects must be
idempotent by event id (a batch is redelivered after a crash): ``services.core.contract.check_service``
checks that, and the rest of the contract, on the in-memory bus (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from services.core.events import Event
from services.core.runtime import Incoming, Service

Handler = Callable[[Service, Any], Awaitable[Event | Iterable[Event] | None]]


def consumer(name: str, *event_types: type[Event], produces: Iterable[type[Event]] = ()
             ) -> Callable[[Handler], type[Service]]:
    """Turn ``async def handler(svc, event)`` into a Service subclass consuming ``event_types`` and
    publishing ``produces`` (declared, so the topology and ``autointerv schemas`` know its topics)."""
    if not event_types:
        raise ValueError("a consumer needs at least one event type to consume")
    outputs = tuple(produces)

    def wrap(handler: Handler) -> type[Service]:
        async def handle(self: Service, batch: list[Incoming]) -> None:
            for item in batch:
                out = await handler(self, item.event)
                for ev in ([out] if isinstance(out, Event) else list(out or [])):
                    await self.emit(ev)

        cls = type(f"Plugin_{name.replace('-', '_')}", (Service,), {
            "name": name, "consumes": tuple(event_types), "produces": outputs, "handle": handle,
            "__doc__": handler.__doc__, "__module__": handler.__module__,
        })
        return cls

    return wrap
