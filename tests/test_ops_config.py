"""Bad input to the config never gives a traceback: each mistake is a ConfigError (exit code 2)
that names the field, variable or file; no experiment id or name can climb out of run_dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from services.cli import main
from services.core.config import ConfigError, dump_config, load_config, mask_url

ROOT = Path(__file__).resolve().parents[1]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_broken_set_value_names_the_key(capsys):
    code, out = _cli(["config", "-c", str(ROOT / "examples/demo.yaml"), "--set", "controller.max_texts=[1,"],
                     capsys)
    assert code == 2 and "--set controller.max_texts" in out and "Traceback" not in out


def test_broken_environment_value_names_the_variable(tmp_path):
    env = {**os.environ, "AUTOINTERV__CONTROLLER__MAX_TEXTS": "[1,", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "config", "-c", str(ROOT / "examples/demo.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "AUTOINTERV__CONTROLLER__MAX_TEXTS" in out and "Traceback" not in out


def test_non_utf8_config_file_names_the_file(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("experiment:\n  name: caf\xe9\n".encode("latin-1"))
    code, out = _cli(["config", "-c", str(p)], capsys)
    assert code == 2 and "latin1.yaml" in out and "UTF-8" in out and "Traceback" not in out


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_config_file_names_the_file(tmp_path, text):
    p = tmp_path / "list.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"list\.yaml must contain a mapping"):
        load_config(p, environ={})


@pytest.mark.parametrize("override", [
    {"experiment": {"id": ".."}}, {"experiment": {"id": "."}}, {"experiment": {"id": "../x"}},
    {"experiment": {"id": "a/b"}}, {"experiment": {"name": "../up"}}, {"experiment": {"name": ".hidden"}},
])
def test_ids_that_would_leave_run_dir_are_rejected(override):
    with pytest.raises(ConfigError, match=r"experiment\.(id|name)"):
        load_config(None, environ={}, overrides=override)


def test_ordinary_ids_still_load():
    cfg = load_config(None, environ={}, overrides={"experiment": {"id": "demo-20260101.1_a", "name": "demo.v2"}})
    assert cfg.experiment_id == "demo-20260101.1_a"


def test_sasl_needs_its_credentials_named():
    with pytest.raises(ConfigError, match=r"bus: .*sasl_mechanism"):
        load_config(None, environ={}, overrides={"bus": {"security_protocol": "SASL_SSL"}})


def test_cache_url_password_is_masked_in_the_dumped_config():
    cfg = load_config(None, environ={"REDIS_URL": "redis://autointerv:s3cr3t-pw@127.0.0.1:7000/0"})
    dumped = dump_config(cfg, mask_secrets=True)
    assert "s3cr3t-pw" not in dumped and "redis://autointerv:***@127.0.0.1:7000/0" in dumped
    assert "s3cr3t-pw" in dump_config(cfg)  # the faithful dump (configs handed to subprocesses) connects
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("rediss://:pw@h:1/0") == "rediss://:***@h:1/0"


def test_report_of_a_missing_run_is_a_message_not_a_traceback(tmp_path):
    console = Console(record=True, width=80)
    from services.cli import build_parser, cmd_report

    args = build_parser().parse_args(["report", str(tmp_path / "nope")])
    assert cmd_report(args, console) == 1
    text = console.export_text()
    assert "no finished run" in text and "Traceback" not in text


def test_config_command_masks_the_cache_password(monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", "redis://autointerv:s3cr3t-pw@127.0.0.1:7000/0")
    assert main(["config", "-c", str(ROOT / "examples/demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t-pw" not in out and "autointerv:***@127.0.0.1:7000" in out
