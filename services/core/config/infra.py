"""Infrastructure sections: the bus, the cache/state store and observability."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.core.config.base import Strict


class BusConfig(Strict):
    bootstrap: str | None = None  # None: start the embedded Tansu broker (or use $KAFKA_BOOTSTRAP)
    topic_prefix: str = "autointerv"
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    max_poll_records: int = Field(default=256, ge=1)
    poll_timeout_ms: int = Field(default=200, ge=1)
    # Tansu completes a group join after session_timeout/2 (measured: 30 s -> 15 s start-up),
    # so the default is short; raise it on real Kafka if event-loop stalls could exceed it.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    # Longest a fetch waits for data.  Tansu answers a waiting fetch only at the deadline, not when
    # data arrives, so aiokafka's 500 ms default added up to 0.5 s per hop (measured: 800 cached
    # texts through the embedder in 0.40 s at 500 ms, 0.13-0.18 s at 100 ms).  Lower costs idle
    # CPU: ~1.3% of a core per idle consumer (broker + client) at 100 ms, ~0.3% at 500 ms.
    fetch_max_wait_ms: int = Field(default=100, ge=0)
    exactly_once: bool = False  # real Kafka only: Tansu rejects idempotent/transactional producers
    client_id: str = "autointerv"
    # deadlines: a flush or commit the broker has not acknowledged after this long raises instead of
    # hanging; the batch is rewound and retried with backoff
    request_timeout_s: float = Field(default=30.0, gt=0)
    # a service that cannot reach the broker for this long stops with a clear message (the run ends
    # with stopped_because "broker_lost"); reconnecting within it carries on where it left off
    broker_loss_s: float = Field(default=60.0, gt=0)
    # on SIGTERM/SIGINT: the most a service spends draining (flush, final commit) before it exits
    shutdown_timeout_s: float = Field(default=8.0, gt=0)
    # real Kafka only (Tansu speaks PLAINTEXT): passed to every aiokafka client by bus.client_security_kwargs
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_env: str | None = None  # name of the env var holding the password, never the password
    ssl_cafile: str | None = None  # CA bundle that signed the brokers' certificates; None: system CAs

    @model_validator(mode="after")
    def _sasl_complete(self) -> BusConfig:
        if self.security_protocol.startswith("SASL_") and not (
                self.sasl_mechanism and self.sasl_username and self.sasl_password_env):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                             "sasl_username and sasl_password_env")
        return self


class CacheConfig(Strict):
    url: str | None = None  # None: start an embedded Valkey under the run's data dir (or $REDIS_URL)
    namespace: str = "ai"
    vector_dtype: Literal["float16", "float32"] = "float16"
    ttl_s: int | None = Field(default=30 * 24 * 3600, ge=1)  # refreshed on hit; None = no expiry
    # per-experiment state (controller, clusterer, validator, LLM budget, endpoints) expires this long
    # after its last write, so finished experiments do not pile up; None = keep until `autointerv clean`
    state_ttl_s: int | None = Field(default=14 * 24 * 3600, ge=60)
    enabled: bool = True
    # a stateful service that cannot reach Redis for this long stops with a clear message; shorter
    # outages are retried (the embedder degrades to encoding without the cache instead)
    outage_s: float = Field(default=60.0, gt=0)


class ObservabilityConfig(Strict):
    metrics_port: int | None = 9464  # /metrics and /healthz; None disables; taken: a free port is used
    metrics_host: str = "127.0.0.1"  # a wildcard address exposes /metrics and /healthz beyond this host
    stall_after_s: float = Field(default=60.0, gt=0)  # alive but no progress while lag > 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress: bool = True  # rich progress in the terminal

