"""One typed experiment config: a YAML file plus environment overrides, validated at start-up.

Environment overrides use ``AUTOINTERV__SECTION__FIELD=value`` (double underscores separate
levels; values are parsed as YAML, so ``[1, 2]`` and ``true`` work).  ``KAFKA_BOOTSTRAP`` and
``REDIS_URL`` select external servers instead of the embedded ones.  Errors name the field:
``models.base.backend: 'gpt5' is not a known generation backend ...``.

The package is split by job; everything is importable from here:

- ``base``: strict models and ConfigError;
- ``infra``: bus, cache, observability;
- ``models``: the two models (one settings model per generation backend, a discriminated union by
  ``backend``), prompts and decoding;
- ``stages``: embedder, clusterer, controller, hypothesizer, LLMs, paired contrasts, ground truth;
- ``validation``: the validator and its tiers (one settings model per tier kind, a union by ``kind``);
- ``plugins``: how those unions take plug-in backends and tiers (services/core/registry.py);
- ``root``: the experiment and the whole Config;
- ``loading``: YAML, overrides, error messages, dumping.
"""

from services.core.config.base import ENV_PREFIX, SAFE_NAME, ConfigError, Strict
from services.core.config.infra import BusConfig, CacheConfig, ObservabilityConfig
from services.core.config.loading import (
    URL_PASSWORD,
    dump_config,
    env_overrides,
    field_path,
    format_validation_error,
    load_config,
    mask_url,
    parse_value,
    set_path,
)
from services.core.config.models import (
    BUILTIN_BACKEND_CONFIGS,
    BackendConfig,
    GeneratorConfig,
    LocalWeightsConfig,
    ModelConfig,
    ModelsConfig,
    OpenAIModelConfig,
    PlantedBehaviour,
    PromptsConfig,
    ReplayModelConfig,
    SimConfig,
    SimModelConfig,
    TransformersModelConfig,
    VLLMModelConfig,
    sim_settings,
)
from services.core.config.plugins import PLUGIN_TAG
from services.core.config.root import Config, ExperimentConfig
from services.core.config.stages import (
    ClustererConfig,
    ContrastConfig,
    ControllerConfig,
    EmbedderConfig,
    GroundTruthConfig,
    HypothesizerConfig,
    LLMConfig,
    PairedConfig,
)
from services.core.config.validation import (
    BUILTIN_TIER_CONFIGS,
    BaseTierConfig,
    EmbeddingTierConfig,
    GenerativeTierConfig,
    KeywordTierConfig,
    LLMTierConfig,
    TierConfig,
    ValidatorConfig,
)

__all__ = [
    "BUILTIN_BACKEND_CONFIGS", "BUILTIN_TIER_CONFIGS", "ENV_PREFIX", "PLUGIN_TAG", "SAFE_NAME", "URL_PASSWORD",
    "BackendConfig", "BaseTierConfig", "BusConfig", "CacheConfig", "ClustererConfig", "Config", "ConfigError",
    "ContrastConfig", "ControllerConfig", "EmbedderConfig", "EmbeddingTierConfig", "ExperimentConfig",
    "GenerativeTierConfig", "GeneratorConfig", "GroundTruthConfig", "HypothesizerConfig", "KeywordTierConfig",
    "LLMConfig", "LLMTierConfig", "LocalWeightsConfig", "ModelConfig", "ModelsConfig", "ObservabilityConfig",
    "OpenAIModelConfig", "PairedConfig", "PlantedBehaviour", "PromptsConfig", "ReplayModelConfig", "SimConfig",
    "SimModelConfig", "Strict", "TierConfig", "TransformersModelConfig", "VLLMModelConfig", "ValidatorConfig",
    "dump_config", "env_overrides", "field_path", "format_validation_error", "load_config", "mask_url",
    "parse_value", "set_path", "sim_settings",
]
