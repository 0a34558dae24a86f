"""The root of the typed config: the experiment's identity and every section."""

from __future__ import annotations

import re
import time

from pydantic import Field, field_validator, model_validator

from services.core.config.base import SAFE_NAME, Strict
from services.core.config.infra import BusConfig, CacheConfig, ObservabilityConfig
from services.core.config.models import GeneratorConfig, ModelsConfig, PromptsConfig, ReplayModelConfig
from services.core.config.stages import (
    ClustererConfig,
    ControllerConfig,
    EmbedderConfig,
    GroundTruthConfig,
    HypothesizerConfig,
    PairedConfig,
)
from services.core.config.validation import ValidatorConfig


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
        replays = [m for m in roles if isinstance(m, ReplayModelConfig)]
        if "source" not in self.prompts.model_fields_set and len(replays) == len(roles):
            path = self.prompts.path or replays[0].path
            self.prompts = self.prompts.model_copy(update={"source": "replay", "path": path})
        elif self.prompts.source == "replay" and not self.prompts.path:
            replayed = next((m.path for m in replays if m.path), None)
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

