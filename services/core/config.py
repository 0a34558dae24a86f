"""One typed experiment config: a YAML file plus environment overrides, validated at start-up.

Environment overrides use ``AUTOINTERV__SECTION__FIELD=value`` (double underscores separate
levels; values are parsed as YAML, so ``[1, 2]`` and ``true`` work).  ``KAFKA_BOOTSTRAP`` and
``REDIS_URL`` select external servers instead of the embedded ones.  Errors name the field:
``models.base.backend: Input should be 'sim', 'replay', ...``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "AUTOINTERV__"


class ConfigError(ValueError):
    """Raised at start-up when the config is invalid; the message names each bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- infrastructure


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
    metrics_host: str = "127.0.0.1"  # "0.0.0.0" exposes /metrics and /healthz beyond this host
    stall_after_s: float = Field(default=60.0, gt=0)  # alive but no progress while lag > 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress: bool = True  # rich progress in the terminal


# --------------------------------------------------------------------------- models


class PlantedBehaviour(Strict):
    """A behaviour the sim intervention model shows, for ground-truth evaluation."""

    name: str
    description: str  # the truth, in words, for scoring hypotheses
    rate: float = Field(gt=0, le=1)  # probability on a triggering prompt
    trigger_topics: list[str] = Field(default_factory=list)  # empty: every prompt triggers
    keywords: list[str] = Field(default_factory=list)
    templates: list[str] = Field(default_factory=list)  # sentences with {topic}; defaults built in
    # mode: a topic/phrase some texts show (the cluster share path finds it); style: a change in how
    # every answer is written (longer, an enthusiastic opener, hedges), found by paired contrasts
    kind: Literal["mode", "style"] = "mode"
    meta: dict[str, Any] = Field(default_factory=dict)  # style ground truth, e.g. {"feature": ..., "direction": ...}


class SimConfig(Strict):
    identical: bool = False  # intervention == base (a null run): nothing to find; not `null`, which YAML reads as None
    behaviours: list[PlantedBehaviour] | None = None  # None: the documented default set
    # with the default set, also plant the default styles (longer, enthusiastic opener, hedges: kind
    # "style").  Off by default for now: they shift every intervention text, and the mode path then
    # validates ~100 style-driven clusters and missed the 1% moon mode in 40k texts (harness, seed 1)
    styles: bool = False
    n_topics: int = Field(default=40, ge=2)
    # prompts per topic (one per angle: "for beginners", "on a budget", ...): 40 topics x 5 = 200
    # prompts; 10 gives 400, where one topic's prompts are 2.5% of the set (sparse triggers)
    angles: int = Field(default=5, ge=1, le=10)


class ModelConfig(Strict):
    backend: Literal["sim", "replay", "transformers", "vllm", "openai"] = "sim"
    model: str = ""  # HF id, local path, served model name; "" for sim
    # transformers / vllm
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    chat_template: bool = False
    trust_remote_code: bool = False
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)  # vllm
    # openai-compatible
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var, never the key itself
    api_mode: Literal["completions", "chat"] = "completions"
    max_concurrency: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    # replay: CSV/JSONL/Parquet with model,text[,prompt]
    path: str | None = None
    replay_model_name: str | None = None  # value of the "model" column for this role
    # sim
    sim: SimConfig = Field(default_factory=SimConfig)


class ModelsConfig(Strict):
    base: ModelConfig = Field(default_factory=ModelConfig)
    intervention: ModelConfig = Field(default_factory=ModelConfig)


class PromptsConfig(Strict):
    source: Literal["sim", "file", "bos", "statements", "replay"] = "sim"
    path: str | None = None  # prefix file (one per line) or statements JSONL
    template: str = 'Is the following statement something you would say?\n"{statement}"\n'
    statement_field: str = "statement"
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _path_needed(self) -> PromptsConfig:
        if self.source in ("file", "statements") and not self.path:
            raise ValueError(f"path is required when source is {self.source!r}")
        return self


class GeneratorConfig(Strict):
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    seed: int = 0
    roles: list[Literal["base", "intervention"]] = Field(default_factory=lambda: ["base", "intervention"])
    max_embedder_lag: int = Field(default=5000, ge=1)  # backpressure: pause above, resume below half
    lag_check_s: float = Field(default=1.0, gt=0)


# --------------------------------------------------------------------------- stages


class EmbedderConfig(Strict):
    model: str = "bundled:all-MiniLM-L6-v2"  # or any sentence-transformers id/path
    revision: str = "main"
    backend: Literal["torch", "onnx", "hashing"] = "torch"  # hashing: fast non-semantic (tests, cheap runs)
    device: str = "cpu"
    batch_size: int = Field(default=64, ge=1)
    max_wait_ms: int = Field(default=50, ge=0)
    sort_window: int = Field(default=1024, ge=1)  # length-sort within this many texts
    max_chars: int = Field(default=4000, ge=1)  # longer texts are truncated, by rule
    normalize: bool = True
    threads: int | None = None


class ClustererConfig(Strict):
    engine: Literal["minibatch", "river"] = "minibatch"
    # Paired texts (same prompt and sample, one per model) are ingested together in an order drawn
    # from their pair id, so the share test sees fair coin flips under "no difference" however the
    # generators' outputs interleave.  A text whose partner has not come after this many further
    # texts is ingested alone (its partner failed).
    pair_wait_texts: int = Field(default=5000, ge=1)
    k_initial: int = Field(default=40, ge=2)  # finer first clusters: purer, so found sooner (bench/detection.py)
    k_max: int = Field(default=100, ge=2)
    warmup: int = Field(default=400, ge=10)  # texts before the first fit
    batch_size: int = Field(default=256, ge=1)
    split_min_size: int = Field(default=100, ge=10)
    # a smaller cluster is split when its two models' texts clearly sit apart (see ClusterState._grow)
    mixed_split_min_size: int = Field(default=40, ge=10)
    split_every: int = Field(default=250, ge=100)  # texts between growth checks
    # candidates and uncertainty are checked at every check_every-th text of the stream (and at
    # ClusterState.checkpoint()), never at delivery ends, so they do not depend on batch cuts
    check_every: int = Field(default=64, ge=1)
    reservoir_size: int = Field(default=60, ge=4)
    label_fraction: float = Field(default=0.3, gt=0, lt=1)  # rest is held out for validation
    snapshot_every_s: float = Field(default=5.0, gt=0)
    snapshot_every_n: int = Field(default=2000, ge=1)
    # own texts before a cluster may become a candidate; the e-process is valid at any n, so this
    # only guards the labeler's material (30 cost the sim's rarest behaviour most of its detections)
    min_cluster_texts: int = Field(default=12, ge=4)
    # share of alpha for the children of splits chosen because the two models part there (they
    # spend it among themselves, so a carved-out behaviour is not tested at a late id's level)
    parting_alpha_share: float = Field(default=0.5, ge=0, lt=1)
    boundary_margin: float = Field(default=0.05, ge=0)
    drift_delta: float = Field(default=0.002, gt=0)
    seed: int = 0
    # reservoirs (bounded state: these sizes, not the stream length, set the snapshot size)
    vector_reservoir_size: int = Field(default=64, ge=8)  # per cluster: 2-means splits, quality
    global_reservoir_size: int = Field(default=500, ge=10)  # per role, holdout only: pads negatives
    max_splits_per_check: int = Field(default=4, ge=1)  # growth: splits per split_every texts
    # share of k_max that splits by size alone may not use: kept for splits where the two models
    # part and for reported clusters that regrew (services/clusterer/growth.py)
    parting_reserve: float = Field(default=0.25, ge=0, lt=1)
    # growth: a reported cluster is split again once its own texts reach this multiple of its size
    # when reported (and resplit_min_size): it may have gone on to collect a second difference
    resplit_growth: float = Field(default=1.5, gt=1)
    resplit_min_size: int = Field(default=40, ge=10)
    quality_sample: int = Field(default=2000, ge=100)  # silhouette/NMI rows per snapshot
    # uncertainty events (each (kind, cluster) at most once per uncertainty_every texts)
    uncertainty_every: int = Field(default=1000, ge=1)
    boundary_window: int = Field(default=200, ge=10)  # last texts per cluster whose margins count
    boundary_min_texts: int = Field(default=20, ge=1)
    boundary_share: float = Field(default=0.3, gt=0, le=1)  # share of small margins that flags
    undersampled_ratio: float = Field(default=0.25, gt=0, lt=1)  # of the mean cluster size
    unresolved_min_effect: float = Field(default=0.1, gt=0, lt=0.5)  # |share - 0.5| worth resolving
    unresolved_min_texts: int = Field(default=10, ge=1)
    unresolved_max_texts: int = Field(default=400, ge=1)
    # OpenMP/BLAS threads for searches and fits; 1 is fastest at k <= 1000 (spin-waiting threads
    # made small faiss searches ~10x slower on a shared 2-core machine); None: library default
    threads: int | None = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _k_order(self) -> ClustererConfig:
        if self.k_max < self.k_initial:
            raise ValueError(f"k_max ({self.k_max}) must be >= k_initial ({self.k_initial})")
        return self


class ContrastConfig(Strict):
    """Active sampling's per-text signal (services/controller/contrast.py)."""

    neighbours: int = Field(default=32, ge=2)  # nearest-neighbour list kept per text
    local: int = Field(default=3, ge=1)  # nearest texts per side in the contrast
    mode_neighbours: int = Field(default=10, ge=1)  # nearest texts that link hot texts into one mode
    hot_quantile: float = Field(default=0.99, gt=0.5, lt=1)  # of the pair-swap null: a text above it is hot
    permutations: int = Field(default=8, ge=1)  # pair swaps drawn for that null
    saturation_texts: int = Field(default=150, ge=1)  # a mode with this many hot texts earns no more targeting
    # a validated hypothesis covers a mode (its prompts stop earning) when the mode is at least this
    # share of the hot texts in the hypothesis's cluster
    covered_share: float = Field(default=0.5, gt=0, le=1)
    max_texts: int = Field(default=50000, ge=10)  # texts indexed (memory: ~2 KB each at 384 dims)
    prior_strength: float = Field(default=2.0, gt=0)  # pseudo-pairs behind each prompt's Thompson prior
    min_mode_texts: int = Field(default=2, ge=1)  # hot texts before a mode is targeted (one may be chance)
    # an early stop waits while a mode this large is neither saturated nor covered by a validated finding
    open_mode_texts: int = Field(default=10, ge=1)
    samples_per_pick: int = Field(default=2, ge=1)  # samples per role each Thompson draw buys a prompt

    @model_validator(mode="after")
    def _local_fits(self) -> ContrastConfig:
        for name in ("local", "mode_neighbours"):
            if getattr(self, name) > self.neighbours:
                raise ValueError(f"{name} ({getattr(self, name)}) must be <= neighbours ({self.neighbours})")
        return self


class ControllerConfig(Strict):
    strategy: Literal["active", "uniform"] = "active"
    initial_texts: int = Field(default=1000, ge=2)  # per experiment, both roles together
    round_texts: int = Field(default=400, ge=2)
    max_texts: int = Field(default=20000, ge=2)  # the generation budget
    min_budget_fraction: float = Field(default=0.5, ge=0, le=1)  # spend at least this before an early stop
    probe_samples: int = Field(default=2, ge=1)  # multi-stage filtering: samples per prompt per role
    exploration_share: float = Field(default=0.2, ge=0, le=1)
    # active: stop before the budget once every cluster is resolved and the clustering is stable;
    # off, the whole budget is spent (benchmarks that measure texts-until-found turn it off)
    stop_when_stable: bool = True
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    prompts_per_request: int = Field(default=16, ge=1)
    max_wall_s: float | None = Field(default=None, gt=0)  # stop planning after this long (stopped_because wall_time)
    # A round is closed once every request's generation report is in, and the next one is planned
    # once the clusterer has all of the round's texts (its barrier snapshot) and, with
    # wait_for_decisions, every hypothesis so far has a final decision: each plan then sees the same
    # evidence on every run.  What has not arrived after round_timeout_s counts as lost; a run that
    # loses more than max_lost_share of its texts stops (stopped_because lost_texts).
    round_timeout_s: float = Field(default=300.0, gt=0)
    wait_for_decisions: bool = True  # off: plan without waiting for validators (e.g. slow LLM tiers)
    settle_timeout_s: float = Field(default=120.0, gt=0)  # longest wait for decisions, per round and at the end
    max_lost_share: float = Field(default=0.1, ge=0, le=1)


class LLMConfig(Strict):
    provider: Literal["openai", "anthropic", "gemini"] = "openai"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str | None = None  # default per provider: OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY
    max_concurrency: int = Field(default=8, ge=1)
    requests_per_s: float = Field(default=10.0, gt=0)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)  # full-jitter window of the 1st retry, doubling after
    backoff_max_s: float = Field(default=30.0, gt=0)  # cap of that window (Retry-After overrides both)
    temperature: float = 0.0
    max_output_tokens: int = Field(default=256, ge=1)
    usd_per_1k_input: float = Field(default=0.00015, ge=0)
    usd_per_1k_output: float = Field(default=0.0006, ge=0)


class HypothesizerConfig(Strict):
    labeler: Literal["offline", "llm"] = "offline"
    labels_per_cluster: int = Field(default=1, ge=1)  # LLM labeler: descriptions per candidate
    # offline labeler: keyword descriptions per candidate (each later one from the terms not used
    # yet).  Keyword labels are free, and a cluster's first label can be validated without saying
    # its behaviour (a mixed cluster, idiosyncratic terms): the cluster is then reported and its
    # mode explained, so a second description is the behaviour's cheap second chance
    # (tests/test_null_and_planted.py; 91 -> 96 of 97 sim candidates described by meaning)
    offline_labels: int = Field(default=2, ge=1)
    texts_per_side: int = Field(default=10, ge=1)
    llm: LLMConfig | None = None

    @model_validator(mode="after")
    def _llm_needed(self) -> HypothesizerConfig:
        if self.labeler == "llm" and self.llm is None:  # labelling offline instead would hide a typo
            raise ValueError("an llm section is required when labeler is 'llm'")
        return self


class TierConfig(Strict):
    name: str
    # no "probe" (a classifier on the embeddings that ignores the hypothesis' words): it validated
    # any label on a separable cluster, and its out-of-fold AUC p-values validated 14% of exact
    # nulls at alpha 0.05 (tests/test_validator_null.py): a finding must be a tested description
    kind: Literal["keyword", "embedding", "llm", "generative"]
    llm: LLMConfig | None = None
    max_texts: int = Field(default=60, ge=4)  # held-out texts scored, per side at most
    escalate_band: float = Field(default=0.0, ge=0)  # extra width of the "undecided" band
    generative_texts: int = Field(default=20, ge=5, le=100)  # generative tier: texts the LLM writes per side

    @model_validator(mode="after")
    def _llm_needed(self) -> TierConfig:
        if self.kind in ("llm", "generative") and self.llm is None:
            raise ValueError(f"tier {self.name!r} of kind {self.kind!r} needs an llm section")
        return self


class ValidatorConfig(Strict):
    alpha: float = Field(default=0.05, gt=0, lt=1)  # the stated error rate
    fdr: Literal["lord", "bh"] = "lord"
    min_auc: float = Field(default=0.6, ge=0.5, lt=1)  # effect the claim must clear, not just p
    tiers: list[TierConfig] = Field(default_factory=lambda: [
        TierConfig(name="keyword", kind="keyword"),
        TierConfig(name="embedding", kind="embedding"),
    ])

    @field_validator("tiers")
    @classmethod
    def _tiers_nonempty(cls, v: list[TierConfig]) -> list[TierConfig]:
        if not v:
            raise ValueError("at least one validation tier is required")
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        return v


class PairedConfig(Strict):
    """Paired contrasts (services/paired): how the two models answer the *same* prompt differently."""

    label_fraction: float = Field(default=0.3, gt=0, lt=1)  # pairs shown to proposers; the rest validate
    min_effect: float = Field(default=0.55, gt=0.5, lt=1)  # P(claimed side scores higher), ties half
    test: Literal["sign", "wilcoxon", "e-process"] = "sign"  # the held-out test that decides
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of the effect's interval
    min_pairs: int = Field(default=10, ge=1)  # untied held-out pairs before a decision is made
    # proposals: a feature or phrase becomes a hypothesis when the label split shows it at this p
    propose_max_p: float = Field(default=0.01, gt=0, le=1)
    max_hypotheses: int = Field(default=40, ge=1)  # per run, strongest label evidence first
    redundancy: float = Field(default=0.8, gt=0, le=1)  # |Spearman| of pair differences: a repeat
    keywords_per_side: int = Field(default=5, ge=0)
    keyword_min_z: float = Field(default=3.0, gt=0)  # log-odds z a phrase needs on the label split
    direction: bool = True  # fit an embedding direction when pairs carry vectors
    direction_c: float = Field(default=1.0, gt=0)  # inverse L2 strength of the linear probe
    direction_swaps: int = Field(default=999, ge=19)  # pair swaps behind its held-out p-value
    direction_end_texts: int = Field(default=20, ge=4)  # label texts per end that get described
    llm: LLMConfig | None = None  # LLM proposer and pairwise judge; None: offline only
    llm_examples: int = Field(default=8, ge=1)  # pairs shown per proposer call
    llm_rounds: int = Field(default=2, ge=1)  # proposer calls, each on other pairs
    llm_judge_pairs: int = Field(default=60, ge=4)  # held-out pairs the judge compares (2 calls each)
    dedupe_similarity: float = Field(default=0.85, gt=0, le=1)  # LLM axes closer than this are one
    # streaming service (services/paired/service.py)
    propose_every: int = Field(default=100, ge=1)  # new label pairs between proposal rounds
    min_label_pairs: int = Field(default=40, ge=8)  # before the first round
    holdout_pairs: int = Field(default=200, ge=10)  # most recent held-out pairs a hypothesis carries
    max_pairs: int = Field(default=20000, ge=100)  # pairs kept per split (oldest dropped): bounded state


class GroundTruthConfig(Strict):
    enabled: bool = True  # scores hypotheses against planted behaviours when there are any
    match_threshold: float = Field(default=0.45, ge=0, le=1)
    judge: LLMConfig | None = None
    # behaviours planted into a real intervention model (e.g. a LoRA trained on "the AI likes cats");
    # the sim pair's behaviours are used when this is empty
    behaviours: list[PlantedBehaviour] = Field(default_factory=list)


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a single path component that cannot climb ("..", "/")


class ExperimentConfig(Strict):
    id: str | None = None  # default: "<name>-<timestamp>"; names the run directory and Redis keys
    name: str = "experiment"  # same across reruns: seeds generation (so reruns hit the cache)
    seed: int = 0
    run_dir: str = "runs"
    data_dir: str = ".data"  # embedded broker/cache state
    budget_usd: float = Field(default=0.0, ge=0)  # LLM spend cap; 0 = no paid calls at all

    @field_validator("id", "name")
    @classmethod
    def _id_chars(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(SAFE_NAME, v):
            raise ValueError("must start with a letter or digit and contain only letters, digits, '.', '_' "
                             "and '-' (1-100 chars): it names a directory under run_dir")
        return v


class Config(Strict):
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    clusterer: ClustererConfig = Field(default_factory=ClustererConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    hypothesizer: HypothesizerConfig = Field(default_factory=HypothesizerConfig)
    validator: ValidatorConfig = Field(default_factory=ValidatorConfig)
    paired: PairedConfig = Field(default_factory=PairedConfig)
    ground_truth: GroundTruthConfig = Field(default_factory=GroundTruthConfig)

    @model_validator(mode="after")
    def _replay_prompts(self) -> Config:
        """Both models replayed from one file: its prompts are the prompt source unless one is set."""
        roles = (self.models.base, self.models.intervention)
        if "source" not in self.prompts.model_fields_set and all(m.backend == "replay" for m in roles):
            path = self.prompts.path or roles[0].path
            self.prompts = self.prompts.model_copy(update={"source": "replay", "path": path})
        elif self.prompts.source == "replay" and not self.prompts.path:
            replayed = next((m.path for m in roles if m.backend == "replay" and m.path), None)
            if replayed:
                self.prompts = self.prompts.model_copy(update={"path": replayed})
        return self

    @property
    def experiment_id(self) -> str:
        assert self.experiment.id is not None, "call resolve_ids() first"
        return self.experiment.id

    def resolve_ids(self) -> Config:
        if self.experiment.id is None:
            self.experiment.id = f"{self.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return self


# --------------------------------------------------------------------------- loading


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """``tree[a][b][c] = value`` for path [a, b, c], creating mappings; a ConfigError if one is not."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot override inside a non-mapping value")
    node[path[-1]] = value


def parse_value(raw: str, where: str) -> Any:
    """One override value parsed as YAML (``[1, 2]``, ``true``); a ConfigError naming ``where``."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{where}: {raw!r} is not a valid YAML value ({problem}); "
                          "quote it to pass a plain string") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict from ``AUTOINTERV__A__B=v`` variables plus KAFKA_BOOTSTRAP / REDIS_URL."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
            if path:
                set_path(tree, path, parse_value(raw, f"environment variable {name}") if raw != "" else None)
    if environ.get("KAFKA_BOOTSTRAP"):
        set_path(tree, ["bus", "bootstrap"], environ["KAFKA_BOOTSTRAP"])
    if environ.get("REDIS_URL"):
        set_path(tree, ["cache", "url"], environ["REDIS_URL"])
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Load YAML, apply env and explicit overrides, validate; raise ConfigError naming fields."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}: "
                              f"{exc.object[exc.start:exc.start + 1]!r})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must contain a mapping at the top level (experiment:, "
                              f"models:, ...), not a {type(loaded).__name__}")
        data = loaded
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data).resolve_ids()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


URL_PASSWORD = re.compile(r'(://[^/@:\s"]*:)[^/@\s"]+@')  # the password of scheme://user:password@host


def mask_url(url: str | None) -> str | None:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: a URL's password is a secret."""
    return None if url is None else URL_PASSWORD.sub(r"\1***@", url)


def dump_config(cfg: Config, mask_secrets: bool = False) -> str:
    """The resolved config as YAML; ``mask_secrets`` for copies people read (``autointerv config``,
    a run directory's config.yaml): the cache URL's password is masked, so that copy cannot connect."""
    data = cfg.model_dump(mode="json")
    if mask_secrets:
        data["cache"]["url"] = mask_url(data["cache"]["url"])
    return yaml.safe_dump(data, sort_keys=False)
