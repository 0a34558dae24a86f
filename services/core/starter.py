"""``autointerv init``: a commented starter config with every section, every knob and its default.

Generated from the typed config itself, so it can never drift from it: the values are the
defaults of :class:`services.core.config.Config`; each knob's comment is the comment next to (or
just above) its field in ``config.py``, else a line from :data:`KNOB_HELP`, plus its allowed
values and bounds read from the field's type.  Optional subsections (LLM settings) are shown
commented out with their own defaults.
"""

from __future__ import annotations

import ast
import inspect
import io
import pkgutil
import textwrap
import tokenize
from functools import cache
from importlib import import_module
from typing import Any, Literal, get_args, get_origin

import orjson
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from services.core import config as config_package
from services.core.config import BackendConfig, Config
from services.core.registry import BACKENDS

HEADER = """\
# autointerv experiment config, written by `autointerv init`.
#
# Every section and knob is shown with its default value; delete what you do not change.
# Check it with `autointerv config -c FILE` (errors name the field), run it with
# `autointerv run -c FILE`.  Any knob can also be set per run with `--set section.knob=value`
# or the environment (AUTOINTERV__SECTION__KNOB=value); KAFKA_BOOTSTRAP and REDIS_URL select
# external servers instead of the embedded ones.
"""


SECTION_HELP: dict[str, str] = {
    "experiment": "what this experiment is called, where its results go, its seed and LLM spend cap",
    "bus": "the Kafka-protocol bus (an embedded Tansu broker unless bootstrap / KAFKA_BOOTSTRAP is set)",
    "cache": "the Redis-protocol cache and state store (an embedded Valkey unless url / REDIS_URL is set)",
    "observability": "/metrics and /healthz, logs and the terminal progress view",
    "models": "the two models compared: base and intervention (sim, replay, transformers, vllm, openai)",
    "prompts": "where prompts come from",
    "generator": "decoding settings shared by both models, and backpressure",
    "embedder": "the sentence-embedding model and its batching",
    "clusterer": "streaming clustering of the embeddings and the per-cluster share test",
    "controller": "where the generation budget goes (active sampling) and when the run stops",
    "hypothesizer": "how candidate clusters are described in words",
    "validator": "how descriptions are tested on held-out texts, tier by tier, under online FDR control",
    "ground_truth": "scoring findings against behaviours known to be planted (sim runs, planted LoRAs)",
}

# Knobs without a comment in config.py: what they mean, in one line.
KNOB_HELP: dict[str, str] = {
    "ExperimentConfig.seed": "seeds sampling, clustering and generation; same seed + name = same texts",
    "ExperimentConfig.run_dir": "results go to <run_dir>/<experiment id>/ (runs/latest points at the newest)",
    "BusConfig.topic_prefix": "topics are <prefix>.<topic>; experiments may share a prefix",
    "BusConfig.partitions": "partitions per topic when created: the most replicas a service can use",
    "BusConfig.replication_factor": "copies of each partition (real Kafka: 3)",
    "BusConfig.max_poll_records": "records handled per batch at most",
    "BusConfig.poll_timeout_ms": "longest wait for a batch before periodic work runs",
    "BusConfig.heartbeat_interval_ms": "consumer-group heartbeat (well under session_timeout_ms)",
    "BusConfig.client_id": "prefix of the Kafka client ids (broker logs, quotas)",
    "BusConfig.sasl_mechanism": "SASL_* protocols: how to authenticate",
    "BusConfig.sasl_username": "SASL_* protocols: the user",
    "CacheConfig.namespace": "prefix of every Redis key this deployment writes",
    "CacheConfig.vector_dtype": "cached vectors are stored at this precision (float16 halves memory)",
    "CacheConfig.enabled": "false: embed every text, never read or write cached vectors",
    "ObservabilityConfig.log_level": "level of the JSON log file in the run directory",
    "BackendConfig.backend": "sim: built-in simulated pair; replay: texts from a file; transformers/vllm: "
                             "local weights; openai: any OpenAI-compatible server; a plug-in's name or "
                             "module:Class (docs/extending.md)",
    "LocalWeightsConfig.dtype": "transformers/vllm weight precision",
    "LocalWeightsConfig.quantization": "transformers: load weights in 4 or 8 bits (bitsandbytes, GPU)",
    "LocalWeightsConfig.chat_template": "wrap prompts in the model's chat template",
    "LocalWeightsConfig.trust_remote_code": "allow model repos to run their own code (only for weights you trust)",
    "OpenAIModelConfig.api_mode": "openai: the /completions or /chat/completions endpoint",
    "OpenAIModelConfig.max_concurrency": "openai: requests in flight at once",
    "OpenAIModelConfig.timeout_s": "openai: seconds per request before it is retried",
    "OpenAIModelConfig.max_retries": "openai: retries per request before its prompts count as failed",
    "SimConfig.n_topics": "sim: topics the simulated models write about",
    "SimConfig.angles": "sim: prompts per topic (1-10)",
    "PromptsConfig.source": "sim: built-in; file: one prompt per line; bos: empty prompts; statements: "
                            "JSONL statements in template; replay: the prompts of the replay file",
    "PromptsConfig.template": "statements: the prompt, with {statement} replaced",
    "PromptsConfig.statement_field": "statements: the JSONL field holding the statement",
    "PromptsConfig.limit": "use at most this many prompts (None: all)",
    "GeneratorConfig.batch_size": "prompts per backend call",
    "GeneratorConfig.max_new_tokens": "tokens generated per text at most",
    "GeneratorConfig.temperature": "sampling temperature (0: greedy)",
    "GeneratorConfig.top_p": "nucleus sampling (1: off)",
    "GeneratorConfig.top_k": "top-k sampling (0: off)",
    "GeneratorConfig.no_repeat_ngram_size": "transformers: forbid repeating n-grams of this size (0: off)",
    "GeneratorConfig.seed": "backend seed, mixed into every sample's seed",
    "GeneratorConfig.roles": "roles this generator serves (split base/intervention across GPUs)",
    "GeneratorConfig.lag_check_s": "seconds between embedder-lag checks",
    "EmbedderConfig.revision": "model revision (hub ids)",
    "EmbedderConfig.device": "cpu, cuda, cuda:1 ...",
    "EmbedderConfig.batch_size": "texts per encoder call",
    "EmbedderConfig.max_wait_ms": "longest a partial batch waits for more texts",
    "EmbedderConfig.normalize": "unit-length vectors (cosine geometry)",
    "EmbedderConfig.threads": "torch CPU threads (None: library default)",
    "ClustererConfig.parting_reserve": "share of k_max kept for splits where the two models part",
    "ClustererConfig.engine": "minibatch: scikit-learn MiniBatchKMeans; river: river's streaming k-means",
    "ClustererConfig.k_initial": "clusters of the first fit",
    "ClustererConfig.k_max": "clusters at most, after splits",
    "ClustererConfig.batch_size": "texts per partial fit",
    "ClustererConfig.split_min_size": "a cluster this large is split when it holds two groups",
    "ClustererConfig.reservoir_size": "example texts kept per cluster (labels, validation)",
    "ClustererConfig.snapshot_every_s": "state saved to Redis (and offsets committed) at least this often",
    "ClustererConfig.snapshot_every_n": "... or every this many texts",
    "ClustererConfig.boundary_margin": "a text this close to two centroids counts as on the boundary",
    "ClustererConfig.drift_delta": "ADWIN sensitivity of the per-cluster share drift detector",
    "ClustererConfig.seed": "clustering seed",
    "ClustererConfig.resplit_min_size": "smallest reported cluster considered for a re-split",
    "ClustererConfig.boundary_min_texts": "texts in the window before boundary events fire",
    "ClustererConfig.unresolved_min_texts": "texts before an undecided share asks for more samples",
    "ClustererConfig.unresolved_max_texts": "texts after which an undecided share stops asking",
    "ControllerConfig.strategy": "active: probe, then sample where the models differ; uniform: every "
                                 "prompt alike",
    "ControllerConfig.round_texts": "texts per sampling round after the initial sample",
    "ControllerConfig.exploration_share": "share of each round spent on random prompts",
    "ControllerConfig.contrast": "active sampling's per-text signal",
    "ControllerConfig.prompts_per_request": "prompts per generation request",
    "ControllerConfig.max_wall_s": "stop generating after this many seconds (None: no limit)",
    "HypothesizerConfig.labeler": "offline: distinctive words; llm: an LLM writes the description",
    "HypothesizerConfig.labels_per_cluster": "descriptions the LLM labeler proposes per candidate cluster",
    "HypothesizerConfig.offline_labels": "keyword descriptions the offline labeler proposes per candidate cluster",
    "HypothesizerConfig.texts_per_side": "example texts per model shown to the labeler",
    "HypothesizerConfig.templated": "also propose the templated share statement (shown as evidence)",
    "HypothesizerConfig.llm": "labeler llm: which LLM and its limits",
    "LLMConfig.provider": "API flavour",
    "LLMConfig.model": "model name at the provider",
    "LLMConfig.base_url": "another OpenAI-compatible server (None: the provider's)",
    "LLMConfig.max_concurrency": "calls in flight at once",
    "LLMConfig.requests_per_s": "rate limit",
    "LLMConfig.timeout_s": "seconds per call",
    "LLMConfig.max_retries": "retries of a failed call",
    "LLMConfig.temperature": "sampling temperature of the LLM",
    "LLMConfig.max_output_tokens": "longest answer",
    "LLMConfig.usd_per_1k_input": "price, for the spend cap (experiment.budget_usd)",
    "LLMConfig.usd_per_1k_output": "price, for the spend cap (experiment.budget_usd)",
    "ValidatorConfig.fdr": "lord: online LORD++ (decides as findings arrive); bh: Benjamini-Hochberg",
    "ValidatorConfig.tiers": "validation tiers, cheapest first; an undecided finding escalates to the next",
    "GroundTruthConfig.match_threshold": "similarity above which a finding matches a planted behaviour",
    "GroundTruthConfig.judge": "an LLM that judges matches instead of similarity",
}


@cache
def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment beside the field, or the comment lines just above it."""
    out: dict[tuple[str, str], str] = {}
    for info in pkgutil.iter_modules(config_package.__path__, config_package.__name__ + "."):
        out.update(_module_comments(inspect.getsource(import_module(info.name))))
    return out


def _module_comments(source: str) -> dict[tuple[str, str], str]:
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                found = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                         if n in comments]
                above: list[str] = []
                n = stmt.lineno - 1
                while n in comments and lines[n - 1].lstrip().startswith("#"):
                    above.insert(0, comments[n])
                    n -= 1
                text = " ".join(above + found).strip()
                if text:
                    out[(node.name, stmt.target.id)] = text
    return out


def _classes(annotation: Any) -> list[type[BaseModel]]:
    """The model classes a field typed ``M``, ``M | None``, ``list[M]`` or a union of models holds."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for arg in get_args(annotation) for c in _classes(arg)]


def _tags(cls: type[BaseModel]) -> dict[str, Any]:
    """A union member's fixed fields (``backend: Literal["sim"]``): what picks it."""
    return {n: get_args(f.annotation)[0] for n, f in cls.model_fields.items()
            if get_origin(f.annotation) is Literal and len(get_args(f.annotation)) == 1}


def _model_class(annotation: Any, value: Any = None) -> type[BaseModel] | None:
    """The model class of a field typed ``M``, ``M | None`` or ``list[M]``; of a discriminated
    union, the member ``value`` (a dumped dict) belongs to."""
    classes = _classes(annotation)
    if len(classes) > 1 and isinstance(value, dict):
        for cls in classes:
            tags = _tags(cls)
            if tags and all(value.get(k) == v for k, v in tags.items()):
                return cls
    return classes[0] if classes else None


def _alternatives(annotation: Any) -> list[str]:
    """One line per member of a discriminated union: its tag and the fields only it has."""
    classes = [c for c in _classes(annotation) if _tags(c)]
    if len(classes) < 2:
        return []
    common = set.intersection(*(set(c.model_fields) for c in classes))
    return [f"{'/'.join(map(str, _tags(c).values()))}: " + (", ".join(n for n in c.model_fields if n not in common)
                                                        or "no fields of its own") for c in classes]


def _choices(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [c for arg in get_args(annotation) for c in _choices(arg)]


def _bounds(info: FieldInfo) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{signs[k]} {getattr(m, k)}" for m in info.metadata for k in signs if hasattr(m, k)]
    return ", ".join(parts)


def _scalar(value: Any) -> str:
    if isinstance(value, str) and ("\n" in value or value.strip() != value):
        return orjson.dumps(value).decode()  # a JSON string is a valid double-quoted YAML scalar
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _help(cls: type[BaseModel], name: str, info: FieldInfo) -> list[str]:
    owners = [k.__name__ for k in cls.__mro__ if isinstance(k, type) and issubclass(k, BaseModel)]
    text = next((t for o in owners if (t := field_comments().get((o, name)) or KNOB_HELP.get(f"{o}.{name}"))), "")
    extra = []
    choices = _choices(info.annotation)
    if issubclass(cls, BackendConfig) and name == "backend":
        choices = BACKENDS.names()  # built-ins and installed plug-ins, not just this member's tag
    if choices:
        extra.append("one of: " + " | ".join(map(str, choices)))
    if _bounds(info):
        extra.append(_bounds(info))
    if extra:
        text = f"{text} ({'; '.join(extra)})" if text else "; ".join(extra)
    return textwrap.wrap(text, 92) if text else []


def _emit(cls: type[BaseModel], values: dict[str, Any], indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for name, info in cls.model_fields.items():
        value = values.get(name)
        sub = _model_class(info.annotation, value)
        out.extend(f"{pad}# {line}" for line in _help(cls, name, info))
        alternatives = _alternatives(info.annotation)
        if alternatives:
            out.append(f"{pad}# settings of its own per kind (set the kind first):")
            out.extend(f"{pad}#   {line}" for line in alternatives)
        if sub is not None and isinstance(value, dict):
            out.append(f"{pad}{name}:")
            _emit(sub, value, indent + 1, out)
        elif sub is not None and value is None and get_origin(info.annotation) is not list:
            out.append(f"{pad}{name}: null")
            out.append(f"{pad}# to set it, replace the line above with (the defaults shown):")
            block = [f"{pad}{name}:"]
            _emit(sub, _example_values(sub), indent + 1, block)
            out.extend(f"{pad}# {line[len(pad):]}" for line in block)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(f"{pad}{name}:")
            out.extend(f"{pad}  - {_scalar(v)}" for v in value)
        else:
            out.append(f"{pad}{name}: {_scalar(value)}")


def _example_values(cls: type[BaseModel]) -> dict[str, Any]:
    """Defaults of a model whose required fields have none (shown as empty strings)."""
    return {n: (i.get_default(call_default_factory=True) if not i.is_required() else "")
            for n, i in cls.model_fields.items()}


def starter_config(name: str = "my-experiment") -> str:
    """The commented YAML; ``experiment.name`` set to ``name``, everything else at its default."""
    defaults = Config().model_dump(mode="json")
    defaults["experiment"]["name"] = name
    out: list[str] = [HEADER]
    for section, info in Config.model_fields.items():
        cls = _model_class(info.annotation)
        assert cls is not None, section
        out.append(f"# --- {section}: {SECTION_HELP.get(section, section)}")
        out.append(f"{section}:")
        _emit(cls, defaults[section], 1, out)
        out.append("")
    return "\n".join(out)
