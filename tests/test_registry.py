"""One registry style: built-ins from a table, plug-ins by entry point or module:Class; each backend
and tier class carries its settings model, and the typed config's unions are those models."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from services.core.config import (
    BUILTIN_BACKEND_CONFIGS,
    BUILTIN_TIER_CONFIGS,
    ConfigError,
    OpenAIModelConfig,
    ReplayModelConfig,
    VLLMModelConfig,
    load_config,
)
from services.core.registry import BACKENDS, SERVICES, TIERS, UnknownExtension

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("registry", "configs"), [(BACKENDS, BUILTIN_BACKEND_CONFIGS), (TIERS, BUILTIN_TIER_CONFIGS)])
def test_every_builtin_class_carries_the_settings_model_the_config_uses(registry, configs) -> None:
    assert list(registry.builtin) == list(configs)
    for name in registry.builtin:
        assert registry.load(name).config_model is configs[name], name


def test_pyproject_entry_points_match_the_tables() -> None:
    """The tables are what counts; the packaged entry points say the same, for tools that list them."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for registry in (BACKENDS, TIERS, SERVICES):
        assert eps[registry.group] == dict(registry.builtin), registry.group


def test_a_backends_fields_live_with_it() -> None:
    cfg = load_config(None, environ={}, overrides={"models": {
        "base": {"backend": "vllm", "model": "m", "gpu_memory_utilization": 0.5},
        "intervention": {"backend": "openai", "model": "m", "api_mode": "chat"}}})
    assert isinstance(cfg.models.base, VLLMModelConfig) and cfg.models.base.gpu_memory_utilization == 0.5
    assert isinstance(cfg.models.intervention, OpenAIModelConfig) and cfg.models.intervention.api_mode == "chat"
    with pytest.raises(ConfigError, match=r"models\.base\.gpu_memory_utilization: Extra inputs"):
        load_config(None, environ={}, overrides={"models": {"base": {"backend": "replay", "path": "x",
                                                                     "gpu_memory_utilization": 0.5}}})
    # the resolved config dumps and loads back to the same members
    import yaml

    from services.core.config import dump_config

    again = load_config(None, environ={}, overrides=yaml.safe_load(dump_config(cfg)))
    assert again.models == cfg.models


def test_a_plugin_backend_by_module_path_is_validated_by_its_own_model() -> None:
    name = "examples.echo_backend:EchoBackend"
    cfg = load_config(None, environ={}, overrides={"models": {"intervention": {"backend": name, "suffix": "!"}}})
    from examples.echo_backend import EchoSettings

    assert isinstance(cfg.models.intervention, EchoSettings) and cfg.models.intervention.suffix == "!"
    with pytest.raises(ConfigError, match=r"models\.intervention\.sufix: Extra inputs"):
        load_config(None, environ={}, overrides={"models": {"intervention": {"backend": name, "sufix": "!"}}})
    with pytest.raises(ConfigError, match=r"models\.base\.backend: .*cannot import 'no_such_module'"):
        load_config(None, environ={}, overrides={"models": {"base": {"backend": "no_such_module:X"}}})


def test_unknown_names_say_what_is_known() -> None:
    with pytest.raises(UnknownExtension, match="built in are keyword, embedding, llm, generative"):
        TIERS.load("probe")
    assert SERVICES.target("sink") == "services.sink:SinkService"
    assert BACKENDS.target("not a path") is None
    replay = load_config(None, environ={}, overrides={"models": {"base": {"backend": "replay", "path": "p"}}})
    assert isinstance(replay.models.base, ReplayModelConfig)
