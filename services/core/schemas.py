"""Files in ``schemas/`` generated from code, and a drift check: one JSON Schema per topic from the
event models, and ``asyncapi.yaml`` from the services' consumes/produces declarations."""

from __future__ import annotations

from pathlib import Path

import orjson

from services.core.events import EVENT_TYPES, SCHEMA_VERSION, Event

ENVELOPE_NOTE = ("Every record also carries CloudEvents-style Kafka headers: ce_id, ce_type, ce_source, "
                 "ce_time, ce_experiment_id, ce_schema_version, ce_specversion.")


def schema_for(etype: type[Event]) -> dict[str, object]:
    schema = etype.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://autointerv.dev/schemas/{etype.topic}.schema.json"
    schema["title"] = etype.__name__
    schema["x-topic"] = etype.topic
    schema["x-cloudevents-type"] = etype.type
    schema["x-schema-version"] = SCHEMA_VERSION
    schema["description"] = ((etype.__doc__ or "").strip().split("\n\n")[0] + " " + ENVELOPE_NOTE).strip()
    return schema


def render(etype: type[Event]) -> bytes:
    return orjson.dumps(schema_for(etype), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def schema_path(directory: Path, etype: type[Event]) -> Path:
    return directory / f"{etype.topic}.schema.json"


ASYNCAPI_FILE = "asyncapi.yaml"
ASYNCAPI_HEADER = (b"# AsyncAPI 3.0 description of the autointerv topics, GENERATED from the services'\n"
                   b"# consumes/produces declarations (services/core/topology.py): do not edit;\n"
                   b"# run `autointerv schemas --write`.\n"
                   b"# Physical topic = <bus.topic_prefix>.<logical>. Payloads reference the JSON Schema files here.\n")


def render_asyncapi() -> bytes:
    """The AsyncAPI document of the default pipeline (every built-in service, the default tiers)."""
    import yaml

    from services.core.config import load_config
    from services.core.topology import asyncapi
    from services.monitor.contract import MONITOR_ASYNCAPI
    from services.orchestrator import declared_topology

    cfg = load_config(None, environ={})
    doc = asyncapi(declared_topology(cfg), partitions=cfg.bus.partitions, extra=MONITOR_ASYNCAPI)
    return ASYNCAPI_HEADER + yaml.safe_dump(doc, sort_keys=False, width=110, allow_unicode=True).encode()


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for etype in EVENT_TYPES:
        p = schema_path(directory, etype)
        p.write_bytes(render(etype))
        out.append(p)
    api = directory / ASYNCAPI_FILE
    api.write_bytes(render_asyncapi())
    out.append(api)
    return out


def check_schemas(directory: Path) -> list[str]:
    """Problems: missing files or files that differ from the models (run `autointerv schemas --write`)."""
    problems = []
    for etype in EVENT_TYPES:
        p = schema_path(directory, etype)
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif orjson.loads(p.read_bytes()) != orjson.loads(render(etype)):
            problems.append(f"{p}: differs from {etype.__name__}; run `autointerv schemas --write`")
    api = directory / ASYNCAPI_FILE
    if not api.is_file():
        problems.append(f"{api}: missing")
    elif api.read_bytes() != render_asyncapi():
        problems.append(f"{api}: stale (the services' declarations changed); run `autointerv schemas --write`")
    return problems
