"""Backend registry: config name -> backend class, imported lazily so optional extras stay optional."""

from __future__ import annotations

from importlib import import_module

from services.core.config import GeneratorConfig, ModelConfig
from services.generator.backends.base import GenerationBackend

BACKENDS: dict[str, str] = {
    "sim": "services.generator.backends.sim:SimBackend",
    "replay": "services.generator.backends.replay:ReplayBackend",
    "transformers": "services.generator.backends.transformers_backend:TransformersBackend",
    "vllm": "services.generator.backends.vllm_backend:VLLMBackend",
    "openai": "services.generator.backends.openai_backend:OpenAIBackend",
}


def make_backend(model_cfg: ModelConfig, gen_cfg: GeneratorConfig, role: str) -> GenerationBackend:
    module, _, cls = BACKENDS[model_cfg.backend].partition(":")
    return getattr(import_module(module), cls)(model_cfg, gen_cfg, role)
