"""The wheel carries the example configs and the JSON Schemas, and without a checkout the CLI
uses the packaged demo config (an installed `autointerv run` used to run the 20,000-text defaults)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from services.core.bundled import default_config_path, schemas_dir
from services.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_schemas_and_example_configs(tmp_path):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:  # build from a copy of the tracked files: no build/ or egg-info in the checkout
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("autointerv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for schema in (ROOT / "schemas").iterdir():
        assert f"services/bundled/schemas/{schema.name}" in names, schema.name
    for example in ("demo.yaml", "null.yaml"):
        assert f"services/bundled/examples/{example}" in names
    assert "services/cli.py" in names and "services/core/resources.py" in names


def test_without_a_checkout_the_demo_config_is_the_default(tmp_path):
    path = default_config_path(cwd=tmp_path)  # an empty directory: no examples/ here
    assert path is not None and path.name == "demo.yaml" and path.parent != tmp_path / "examples"
    cfg = load_config(path, environ={})
    assert cfg.experiment.name == "demo" and cfg.controller.max_texts == 6000
    assert (schemas_dir(cwd=tmp_path) / "texts.schema.json").is_file()


def test_cli_in_an_empty_directory_loads_the_demo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "services.cli", "config"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "max_texts: 6000" in proc.stdout and "name: demo" in proc.stdout
