"""The pipeline's topology, derived from what each service declares it consumes and produces.

Start order, stop order, the consumer groups ``autointerv status`` expects and the AsyncAPI
document all come from the same declarations (``Service.inputs()`` / ``Service.outputs()``), as
FastStream derives its docs from its handlers: a plug-in that declares its topics appears in all
of them without anyone editing a list.

The event graph has one cycle by design: the controller (``origin = True``) plans generation from
what the pipeline found.  Edges *into* an origin are feedback; without them the graph is acyclic
and its topological order puts producers before their consumers.  Services stop in that order
(the controller first, so downstream services drain what is in flight) and start in reverse (the
sink first, so nothing is produced before its readers exist).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.core.events import EVENTS_BY_TOPIC, SCHEMA_VERSION, Hypothesis
from services.core.topics import ESCALATION_PREFIX

if TYPE_CHECKING:
    from services.core.runtime import Service


class TopologyError(ValueError):
    """The declared services do not form a valid pipeline (a cycle not through an origin)."""


@dataclass(frozen=True)
class Node:
    name: str  # display name, unique in one process ("validator:keyword")
    service: str  # service kind ("validator")
    inputs: tuple[str, ...]  # logical topics
    outputs: tuple[str, ...]
    group: str | None  # consumer group; None for services that consume nothing
    origin: bool


class Topology:
    def __init__(self, nodes: Sequence[Node]) -> None:
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise TopologyError(f"duplicate service names: {sorted({n for n in names if names.count(n) > 1})}")
        self.nodes = list(nodes)
        self.stop_order = self._order()
        self.start_order = list(reversed(self.stop_order))

    @classmethod
    def of(cls, services: Iterable[Service]) -> Topology:
        return cls([Node(s.display_name, s.name, tuple(s.inputs()), tuple(s.outputs()),
                         s.group_id() if s.inputs() else None, s.origin) for s in services])

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def edges(self) -> list[tuple[str, str, str]]:
        """(producer, consumer, logical topic), feedback edges into origins left out."""
        return [(a.name, b.name, t) for a in self.nodes for b in self.nodes if a is not b and not b.origin
                for t in a.outputs if t in b.inputs]

    def _order(self) -> list[str]:
        """Kahn's algorithm, ties broken by declaration order (so the order is stable)."""
        preds: dict[str, set[str]] = {n.name: set() for n in self.nodes}
        for a, b, _ in self.edges():
            preds[b].add(a)
        order: list[str] = []
        left = [n.name for n in self.nodes]
        while left:
            ready = [n for n in left if not (preds[n] - set(order))]
            if not ready:
                raise TopologyError(f"services {left} form a cycle that passes through no origin service; "
                                    "mark the service that starts the cycle with origin = True")
            order.append(ready[0])
            left.remove(ready[0])
        return order

    def groups(self) -> list[str]:
        """Consumer groups, one per consuming service instance, in start order."""
        return list(dict.fromkeys(g for n in self.start_order if (g := self.node(n).group)))

    def topics(self) -> list[str]:
        """Every logical topic some service reads or writes."""
        return list(dict.fromkeys(t for n in self.nodes for t in (*n.outputs, *n.inputs)))

    def writers(self, topic: str) -> list[str]:
        """Services writing ``topic``, in pipeline (stop) order."""
        return [n for n in self.stop_order if topic in self.node(n).outputs]

    def readers(self, topic: str) -> list[str]:
        return [n for n in self.stop_order if topic in self.node(n).inputs]


# --------------------------------------------------------------------------- AsyncAPI


def _channel_id(topic: str) -> str:
    if topic.startswith(ESCALATION_PREFIX):
        return "escalations"
    head, *rest = topic.split("-")
    return head + "".join(w.capitalize() for w in rest)


def _event_of(topic: str) -> type:
    return Hypothesis if topic.startswith(ESCALATION_PREFIX) else EVENTS_BY_TOPIC[topic]


def _who(names: list[str]) -> list[str]:
    """Service kinds, validator tiers folded into one entry."""
    return list(dict.fromkeys(n.split(":")[0] for n in names))


def asyncapi(topology: Topology, partitions: int = 4, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An AsyncAPI 3.0 document for the topology: one channel per logical topic (escalation topics
    folded into one parameterised channel), a send and a receive operation per channel naming the
    services, and message payloads referencing the generated JSON Schema files.  ``extra`` merges
    channels/operations/components of producers that are not pipeline services (the monitor)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    topics = sorted(topology.topics(), key=lambda t: (t.startswith(ESCALATION_PREFIX), list(EVENTS_BY_TOPIC).index(t)
                                                      if t in EVENTS_BY_TOPIC else 99, t))
    for topic in topics:
        cid = _channel_id(topic)
        etype = _event_of(topic)
        msg = etype.__name__
        escalation = topic.startswith(ESCALATION_PREFIX)
        writers = _who([w for t in topology.topics() if _channel_id(t) == cid for w in topology.writers(t)])
        readers = _who([r for t in topology.topics() if _channel_id(t) == cid for r in topology.readers(t)])
        if cid in channels:
            continue
        params: dict[str, Any] = {"prefix": {"$ref": "#/components/parameters/prefix"}}
        if escalation:
            params["tier"] = {"description": "validator tier name (validator.tiers[].name), not the first"}
        doc = (etype.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        channels[cid] = {
            "address": "{prefix}.escalations.{tier}" if escalation else f"{{prefix}}.{topic}",
            "title": "escalations.<tier>" if escalation else topic,
            "description": (("Hypotheses a validator tier left undecided, for the next (dearer) tier. " if escalation
                             else doc + " ") + f"Key: {etype.key_doc}."),
            "parameters": params,
            "messages": {msg: {"$ref": f"#/components/messages/{msg}"}},
            "bindings": {"kafka": {"partitions": partitions, "replicas": 1, "bindingVersion": "0.5.0"}},
        }
        op = "Escalation" if escalation else msg
        operations[f"send{op}"] = {
            "action": "send", "channel": {"$ref": f"#/channels/{cid}"},
            "messages": [{"$ref": f"#/channels/{cid}/messages/{msg}"}],
            "summary": f"Sent by: {', '.join(writers) or 'nobody in this topology'}.", "x-services": writers}
        if readers:
            operations[f"receive{op}"] = {
                "action": "receive", "channel": {"$ref": f"#/channels/{cid}"},
                "messages": [{"$ref": f"#/channels/{cid}/messages/{msg}"}],
                "summary": f"Received by: {', '.join(readers)} (one consumer group per experiment and service).",
                "x-services": readers,
                "bindings": {"kafka": {"groupId": {
                    "type": "string",
                    "description": "<prefix>.<experiment_id>.<service>; generator: ...generator-<roles>; "
                                   "validator: ...validator.<tier>"}, "bindingVersion": "0.5.0"}}}
        if msg not in messages:
            messages[msg] = {
                "name": msg, "title": msg, "summary": doc.split(". ")[0].rstrip(".") + ".",
                "contentType": "application/json",
                "headers": {"$ref": "#/components/schemas/CloudEventsHeaders"},
                "payload": {"schemaFormat": "application/schema+json;version=draft-2020-12",
                            "schema": {"$ref": f"{etype.topic}.schema.json"}},
                "correlationId": {"description": "ce_id is the event's natural id (dedupe key)",
                                  "location": "$message.header#/ce_id"},
                "bindings": {"kafka": {"key": {"type": "string", "description": etype.key_doc},
                                       "schemaIdLocation": "header", "bindingVersion": "0.5.0"}},
                "x-ce-type": etype.type}
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {"title": "autointerv event bus", "version": SCHEMA_VERSION,
                 "description": "Topics of the autointerv pipeline, generated from the services' consumes/produces "
                                "declarations (`autointerv schemas --write`; tests fail when this file is stale). "
                                "Physical topic = <bus.topic_prefix>.<logical>. Payloads are JSON (orjson) validated "
                                "by the JSON Schema files next to this document. Delivery is at-least-once: "
                                "consumers commit after their outputs are acknowledged and dedupe by ce_id."},
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {"host": "127.0.0.1:{port}", "protocol": "kafka",
                         "description": "Tansu started by `autointerv infra` / `autointerv run` (memory only)",
                         "variables": {"port": {"description": "free port chosen at start-up"}}},
            "compose": {"host": "kafka:9092", "protocol": "kafka", "protocolVersion": "3.8",
                        "description": "Apache Kafka (KRaft) from docker-compose.yml"}},
        "channels": channels,
        "operations": operations,
        "components": {"parameters": {"prefix": {"description": "bus.topic_prefix", "default": "autointerv"}},
                       "messages": messages, "schemas": {"CloudEventsHeaders": CLOUDEVENTS_HEADERS}},
    }
    for section, entries in (extra or {}).items():
        target = doc["components"] if section in ("messages", "schemas") else doc
        target.setdefault(section, {}).update(entries)
    return doc


CLOUDEVENTS_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents 1.0 binary content mode: attributes travel as Kafka headers with the ce_ prefix "
                   "(UTF-8 bytes). Routing and dedupe never need to parse the body.",
    "required": ["ce_id", "ce_type", "ce_source", "ce_time", "ce_experiment_id", "ce_schema_version",
                 "ce_specversion"],
    "properties": {
        "ce_id": {"type": "string", "description": "the event's natural id (Event.event_id(): text_id, "
                                                   "hypothesis_id, ...); consumers dedupe on it"},
        "ce_type": {"type": "string", "description": "event type, e.g. autointerv.text.decoded"},
        "ce_source": {"type": "string", "description": "autointerv/<service>/<instance>"},
        "ce_time": {"type": "string", "description": "producer wall-clock time, Unix seconds as a decimal string"},
        "ce_experiment_id": {"type": "string", "description": "experiment id; services skip records of other "
                                                             "experiments"},
        "ce_schema_version": {"type": "string", "description": "payload schema version "
                                                              "(services.core.events.SCHEMA_VERSION)"},
        "ce_specversion": {"type": "string", "const": "1.0"},
    },
}
