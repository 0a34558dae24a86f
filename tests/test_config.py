"""One typed config: YAML + environment overrides, validated at start-up with errors naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_valid():
    cfg = load_config(ROOT / "examples" / "demo.yaml", environ={})
    assert cfg.experiment_id.startswith("demo-") and cfg.models.base.backend == "sim"
    # the demo shows both kinds of finding: modes and the styles paired contrasts find
    assert cfg.models.intervention.sim.styles and cfg.paired.enabled


def test_the_real_data_example_replays_the_shared_hc3_file():
    cfg = load_config(ROOT / "examples" / "hc3.yaml", environ={})
    assert {cfg.models.base.backend, cfg.models.intervention.backend} == {"replay"}
    assert cfg.prompts.source == "replay"  # the file's own prompts when both models replay
    path = ROOT / cfg.models.intervention.path
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not next to this checkout)")
    import orjson

    models = {orjson.loads(line)["model"] for line in path.read_bytes().splitlines() if line.strip()}
    assert {cfg.models.base.replay_model_name, cfg.models.intervention.replay_model_name} == models


def test_environment_overrides_nested_fields_and_servers():
    cfg = load_config(None, environ={"AUTOINTERV__CONTROLLER__MAX_TEXTS": "1234", "KAFKA_BOOTSTRAP": "k:9092",
                                     "REDIS_URL": "redis://r:6379/0", "AUTOINTERV__GENERATOR__ROLES": "[base]"})
    assert cfg.controller.max_texts == 1234 and cfg.generator.roles == ["base"]
    assert cfg.bus.bootstrap == "k:9092" and cfg.cache.url == "redis://r:6379/0"


@pytest.mark.parametrize(("data", "field"), [
    ({"models": {"base": {"backend": "gpt5"}}}, "models.base.backend"),
    ({"controller": {"max_texts": -1}}, "controller.max_texts"),
    ({"clusterer": {"k_initial": 50, "k_max": 10}}, "clusterer"),
    ({"embedder": {"batch_sise": 8}}, "embedder.batch_sise"),
    ({"validator": {"tiers": [{"name": "judge", "kind": "llm"}]}}, "validator.tiers.0"),
    ({"prompts": {"source": "file"}}, "prompts"),
    ({"experiment": {"id": "has spaces"}}, "experiment.id"),
])
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides=data)
    assert field in str(err.value)


def test_bad_yaml_file_is_reported(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_cli_fails_at_start_up_naming_the_field():
    proc = subprocess.run([sys.executable, "-m", "services.cli", "config", "--config", "examples/demo.yaml",
                           "--set", "controller.strategy=clever"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "controller.strategy" in proc.stdout + proc.stderr


def test_conflicting_command_line_overrides_name_the_field() -> None:
    from services.cli import _overrides

    assert _overrides(["controller.max_texts=500", "controller.strategy=uniform"]) == {
        "controller": {"max_texts": 500, "strategy": "uniform"}}
    with pytest.raises(ConfigError, match=r"controller\.max_texts"):
        _overrides(["controller=1", "controller.max_texts=500"])
