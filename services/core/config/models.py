"""The two models compared, their prompts and decoding.

Each generation backend has its own settings model holding the fields it reads and no others
(vLLM's ``gpu_memory_utilization`` is not a field of a replay model); ``models.base`` and
``models.intervention`` are a pydantic discriminated union of them by ``backend``, extended by
plug-in backends through the registry (services/core/config/plugins.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, SerializeAsAny, Tag, WrapValidator, model_validator

from services.core.config.base import Strict
from services.core.config.plugins import PLUGIN_TAG, plugin_member, tagger
from services.core.registry import BACKENDS


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


class BackendConfig(Strict):
    """What every generation backend's settings share.  A backend class names its own subclass as
    ``config_model``; a plug-in backend's model subclasses this one."""

    backend: str
    model: str = ""  # HF id, local path, served model name; "" for sim


class SimModelConfig(BackendConfig):
    """The built-in simulated pair (services/generator/backends/sim.py)."""

    backend: Literal["sim"] = "sim"
    sim: SimConfig = Field(default_factory=SimConfig)


class ReplayModelConfig(BackendConfig):
    """Texts read back from a file instead of generated (services/generator/backends/replay.py)."""

    backend: Literal["replay"] = "replay"
    # replay: CSV/JSONL/Parquet with model,text[,prompt]
    path: str | None = None
    replay_model_name: str | None = None  # value of the "model" column for this role


class LocalWeightsConfig(BackendConfig):
    """Weights loaded into this process: what transformers and vLLM share."""

    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    chat_template: bool = False
    trust_remote_code: bool = False


class TransformersModelConfig(LocalWeightsConfig):
    """Hugging Face transformers, batched on one device (services/generator/backends/transformers_backend.py)."""

    backend: Literal["transformers"] = "transformers"


class VLLMModelConfig(LocalWeightsConfig):
    """A vLLM engine in this process (services/generator/backends/vllm_backend.py)."""

    backend: Literal["vllm"] = "vllm"
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)  # vllm


class OpenAIModelConfig(BackendConfig):
    """Any OpenAI-compatible server (services/generator/backends/openai_backend.py)."""

    backend: Literal["openai"] = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var, never the key itself
    api_mode: Literal["completions", "chat"] = "completions"
    max_concurrency: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)


# backend name -> its settings; the registry (services/core/registry.py BACKENDS) names the classes
BUILTIN_BACKEND_CONFIGS: Mapping[str, type[BackendConfig]] = MappingProxyType({
    "sim": SimModelConfig, "replay": ReplayModelConfig, "transformers": TransformersModelConfig,
    "vllm": VLLMModelConfig, "openai": OpenAIModelConfig,
})

# One role's model: a discriminated union by ``backend`` (no backend: the sim, as always).
ModelConfig = Annotated[
    Annotated[SimModelConfig, Tag("sim")] | Annotated[ReplayModelConfig, Tag("replay")]
    | Annotated[TransformersModelConfig, Tag("transformers")] | Annotated[VLLMModelConfig, Tag("vllm")]
    | Annotated[OpenAIModelConfig, Tag("openai")] | Annotated[SerializeAsAny[BackendConfig], Tag(PLUGIN_TAG)],
    Discriminator(tagger("backend", "sim", BUILTIN_BACKEND_CONFIGS)),
    WrapValidator(plugin_member(BACKENDS, "backend", "sim", BUILTIN_BACKEND_CONFIGS)),
]


def sim_settings(model: BackendConfig) -> SimConfig:
    """The sim settings of a role's model; the defaults for any other backend (the sim prompt
    source and ground truth read them whatever generates the texts)."""
    return model.sim if isinstance(model, SimModelConfig) else SimConfig()


class ModelsConfig(Strict):
    base: ModelConfig = Field(default_factory=SimModelConfig)
    intervention: ModelConfig = Field(default_factory=SimModelConfig)


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

