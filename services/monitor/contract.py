"""The faust topic monitor's part of the AsyncAPI document: it writes ``<prefix>.monitor``, which
is not a pipeline service's topic, so ``services.core.topology.asyncapi`` merges this in."""

from __future__ import annotations

from typing import Any

MONITOR_ASYNCAPI: dict[str, Any] = {
    "channels": {
        "monitor": {
            "address": "{prefix}.monitor",
            "title": "monitor",
            "description": "Per-window throughput summary from the faust topic monitor "
            "(services/monitor/faust_app.py). Key: experiment id. Not a "
            "pipeline input.",
            "parameters": {"prefix": {"$ref": "#/components/parameters/prefix"}},
            "messages": {"MonitorWindow": {"$ref": "#/components/messages/MonitorWindow"}},
        }
    },
    "operations": {
        "sendMonitorWindow": {
            "action": "send",
            "channel": {"$ref": "#/channels/monitor"},
            "messages": [{"$ref": "#/channels/monitor/messages/MonitorWindow"}],
            "summary": "Sent by: monitor, once per closed window and experiment.",
            "x-services": ["monitor"],
        }
    },
    "messages": {
        "MonitorWindow": {
            "name": "MonitorWindow",
            "title": "MonitorWindow",
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/CloudEventsHeaders"},
            "payload": {"$ref": "#/components/schemas/MonitorWindow"},
            "bindings": {
                "kafka": {"key": {"type": "string", "description": "experiment id"}, "bindingVersion": "0.5.0"}
            },
            "x-ce-type": "autointerv.monitor.window",
        }
    },
    "schemas": {
        "MonitorWindow": {
            "type": "object",
            "required": ["experiment_id", "window_start", "window_end", "window_s", "total", "per_s", "topics"],
            "properties": {
                "experiment_id": {"type": "string"},
                "window_start": {"type": "number"},
                "window_end": {"type": "number"},
                "window_s": {"type": "number"},
                "total": {"type": "integer"},
                "per_s": {"type": "number"},
                "generated_at": {"type": "number"},
                "topics": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "records": {"type": "integer"},
                            "per_s": {"type": "number"},
                            "types": {"type": "object", "additionalProperties": {"type": "integer"}},
                        },
                    },
                },
            },
        }
    },
}
