"""Operator commands: report (80 columns, --json/--csv), status tables at 80 columns, init, tail
against the real broker, and the run header."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from rich.console import Console

from services.cli import main, model_label
from services.core.bus import PartitionLag, Topics, ensure_topics
from services.core.config import Config, ReplayModelConfig, SimModelConfig, VLLMModelConfig, load_config
from services.core.endpoints import Endpoint
from services.monitor.status import (
    GroupStatus,
    GroupTopicLag,
    StatusReport,
    TopicOffsets,
    render_endpoints,
    render_status,
)
from services.monitor.tail import tail_topic
from services.sink.table import render_table

ROWS = [
    {"decision": "validated", "direction": "intervention", "text": "mentions the moon when asked about gardening "
     "and cooking, often in the last sentence", "p_value": 1.2e-05, "q_value": 0.0031, "auc": 0.81, "auc_lo": 0.72,
     "auc_hi": 0.9, "share_diff": 0.123, "share_diff_lo": 0.05, "share_diff_hi": 0.2, "tier": "embedding"},
    {"decision": "rejected", "direction": "base", "text": "short", "p_value": 0.4, "q_value": 0.9, "auc": 0.52,
     "auc_lo": 0.4, "auc_hi": 0.61, "share_diff": -0.01, "share_diff_lo": -0.05, "share_diff_hi": 0.03,
     "tier": "keyword"},
]


def _lines(console: Console) -> list[str]:
    return console.export_text().splitlines()


def test_report_table_fits_80_columns_and_keeps_every_number():
    console = Console(record=True, width=80, color_system=None)
    render_table(ROWS, console)
    lines = _lines(console)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    # one row per finding (the rejected hypothesis is counted under the table, not listed as one)
    for needle in ("Findings: 1", "mentions the moon", "in the last", "+12.3 pp", "[+5.0,+20.0]", "0.81", "1.2e-5",
                   "1 rejected"):
        assert needle in text, needle
    assert "short" not in text


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "demo-1"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in ROWS) + b"\n")
    return run


def test_report_json_and_csv(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["report", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["decision"] for r in rows] == ["validated", "rejected"] and rows[0]["p_value"] == 1.2e-05
    assert main(["report", str(run), "--csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(parsed) == 2 and parsed[1]["tier"] == "keyword"


def test_report_without_a_run_is_a_clean_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "runs" / "latest")]) == 1
    out = capsys.readouterr()
    assert "no finished run" in out.out and "Traceback" not in out.out + out.err


def _status_report() -> StatusReport:
    prefix, exp = "autointerv", "demo-20261129-091837"
    topics = [TopicOffsets(f"{prefix}.{t}", t, {0: 1560, 1: 1561, 2: 1499, 3: 1600})
              for t in ("generation-requests", "texts", "embeddings", "escalations.embedding")]
    groups = []
    for svc, topic in (("validator.embedding", "escalations.embedding"), ("embedder", "texts")):
        parts = [PartitionLag(f"{prefix}.{topic}", p, 1560 + p, 1400 + p) for p in range(4)]
        groups.append(GroupStatus(f"{prefix}.{exp}.{svc}", "Stable",
                                  [GroupTopicLag(f"{prefix}.{exp}.{svc}", f"{prefix}.{topic}", topic, parts)],
                                  expected=True, discovered=True))
    groups.append(GroupStatus(f"{prefix}.{exp}.clusterer", "unknown", [], expected=True, discovered=False))
    return StatusReport("127.0.0.1:39999", prefix, time.time(), topics, groups, True)


def test_status_tables_fit_80_columns():
    console = Console(record=True, width=80, color_system=None)
    render_status(_status_report(), console, experiment="demo-20261129-091837")
    ep = Endpoint("demo-20261129-091837", "pipeline", 12345, "host", "http://127.0.0.1:41234", time.time())
    render_endpoints([(ep, "ok")], console, "demo-20261129-091837")
    lines = _lines(console)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    for needle in ("generation-requests", "escalations.embedding", "6,220", "validator.embedding", "embedder",
                   "clusterer", "not joined", "6,246", "640", "0:160", "http://127.0.0.1:41234/metrics", "12345"):
        assert needle in text, needle
    for header in ("topic", "parts", "records", "committed", "end", "lag"):
        assert header in text


def test_init_writes_a_commented_config_that_loads_with_the_defaults(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    assert main(["init", str(path)]) == 0
    text = path.read_text()
    cfg = load_config(path, environ={})
    defaults = Config().model_dump(mode="json")
    got = cfg.model_dump(mode="json")
    assert got["experiment"]["name"] == "exp"
    got["experiment"].update(id=None, name=defaults["experiment"]["name"])
    assert got == defaults
    data = yaml.safe_load(text)
    assert list(data) == list(Config.model_fields)  # every section, in order
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) > 150 and "# a LLM" not in text
    assert "one of: sim | replay | transformers | vllm | openai" in text  # allowed values from the types
    assert "# llm:" in text and "#   provider: openai" in text  # optional sections shown commented out
    assert main(["init", str(path)]) == 1  # never overwrites without --force
    assert main(["init", str(path), "--force", "--name", "other"]) == 0
    assert load_config(path, environ={}).experiment.name == "other"


def test_run_header_names_the_replay_file_not_sim():
    assert model_label(ReplayModelConfig(path="/data/pairs.parquet", replay_model_name="lora-7b")) \
        == "replay:/data/pairs.parquet [lora-7b]"
    assert model_label(VLLMModelConfig(model="meta/llama")) == "vllm:meta/llama"
    assert model_label(SimModelConfig()) == "sim"


async def _produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for ev in events:
            await producer.send_and_wait(topic, orjson.dumps(ev))
        await producer.send_and_wait(topic, b"not json at all")
    finally:
        await producer.stop()


async def test_tail_prints_one_experiments_events_as_json_lines(kafka_bootstrap, unique):
    topics = Topics(f"tl{unique}")
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    events = [{"experiment_id": "a" if i % 2 else "b", "i": i} for i in range(6)]
    await _produce(kafka_bootstrap, topics.name("texts"), events)
    out = io.StringIO()
    n = await tail_topic(kafka_bootstrap, topics.name("texts"), experiment="a", from_beginning=True,
                         exit_at_end=True, out=out)
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == 3 and sorted(g["i"] for g in got) == [1, 3, 5]
    assert all(g["_topic"] == topics.name("texts") and g["experiment_id"] == "a" for g in got)
    out = io.StringIO()  # all experiments, first 7 records: the undecodable one is shown, not skipped
    assert await tail_topic(kafka_bootstrap, topics.name("texts"), from_beginning=True, limit=7, out=out) == 7
    assert sum("_undecodable_b64" in line for line in out.getvalue().splitlines()) == 1


def test_tail_command_reads_the_logical_topic(kafka_bootstrap, unique, monkeypatch, capsys):
    topics = Topics(f"tc{unique}")
    asyncio.run(ensure_topics(kafka_bootstrap, topics.all(), 1, 1))
    asyncio.run(_produce(kafka_bootstrap, topics.name("dead-letters"), [{"experiment_id": "x", "k": 1}]))
    monkeypatch.setenv("KAFKA_BOOTSTRAP", kafka_bootstrap)
    code = main(["tail", "dead-letters", "--set", f"bus.topic_prefix={topics.prefix}", "--from-beginning",
                 "-n", "1", "-e", "x"])
    assert code == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["k"] == 1


def test_tail_help_says_what_works_instead_of_kcat(capsys):
    with pytest.raises(SystemExit):
        main(["tail", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "kcat" in help_text and "Read underflow" in help_text and "aiokafka" in help_text
