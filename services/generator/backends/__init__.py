"""Generation backends, found through the one registry (services/core/registry.py BACKENDS):
built-ins by name, plug-ins by the ``autointerv.backends`` entry-point group or ``module:Class``.
Classes are imported on first use, so optional extras (torch, vLLM) stay optional."""

from __future__ import annotations

from services.core.config import BackendConfig, GeneratorConfig
from services.core.registry import BACKENDS
from services.generator.backends.base import GenerationBackend


def make_backend(model_cfg: BackendConfig, gen_cfg: GeneratorConfig, role: str) -> GenerationBackend:
    """The backend ``model_cfg.backend`` names, bound to ``role`` (its settings were validated by the
    class's own ``config_model`` when the config was loaded)."""
    return BACKENDS.load(model_cfg.backend)(model_cfg, gen_cfg, role)
