"""Sections of the pipeline's stages: embedder, clusterer, controller, hypothesizer, LLMs, paired
contrasts and ground truth (the validator's tiers are in validation.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.core.config.base import Strict
from services.core.config.models import PlantedBehaviour


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


class PairedConfig(Strict):
    """Paired contrasts (services/paired): how the two models answer the *same* prompt differently."""

    # on by default: a fine-tune, RLHF stage or system prompt mostly changes *how* every prompt is
    # answered, which the cluster share path (modes) cannot see
    enabled: bool = True
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

