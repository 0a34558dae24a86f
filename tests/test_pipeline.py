"""The whole pipeline, end to end, over the real broker and Redis: every service as in `make run`.

The embedder uses the `hashing` backend here so a run takes seconds, not minutes, on two cores; the
statistics under test (paired share tests, held-out validation, online FDR) do not depend on the
embedding model, and `make run` exercises the bundled MiniLM on the same code path.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from services.core.config import Config, load_config
from services.core.infra import Endpoints
from services.orchestrator import run_pipeline_async

pytestmark = pytest.mark.slow


def _cfg(unique: str, run_dir: Path, *, null: bool, seed: int, max_texts: int, alpha: float = 0.05) -> Config:
    sim = {"backend": "sim", "sim": {"identical": null}}
    return load_config(None, environ={}, overrides={
        "experiment": {"id": f"pipe-{unique}", "seed": seed, "run_dir": str(run_dir)},
        "bus": {"topic_prefix": f"p-{unique}", "partitions": 2},
        "cache": {"namespace": f"ns-{unique}"},
        "observability": {"metrics_port": None, "progress": False},
        "models": {"base": sim, "intervention": sim},
        "generator": {"seed": seed},
        "embedder": {"backend": "hashing"},
        "clusterer": {"k_initial": 40, "k_max": 120, "warmup": 800, "split_min_size": 60,
                      "snapshot_every_s": 1.0, "seed": seed},
        "controller": {"initial_texts": 2000, "round_texts": 1200, "max_texts": max_texts},
        "validator": {"alpha": alpha},
    })


async def _run(cfg: Config, kafka_bootstrap: str, redis_url: str) -> dict:
    ep = Endpoints(kafka_bootstrap, redis_url, embedded_broker=False, embedded_cache=False)
    outcome = await run_pipeline_async(cfg, ep, console=None)
    assert outcome.finished, outcome.reason
    run_dir = outcome.run_dir
    for name in ("config.yaml", "texts.parquet", "clusters.json", "hypotheses.parquet", "results.jsonl",
                 "summary.json", "report.html"):
        assert (run_dir / name).is_file(), name
    return orjson.loads((run_dir / "summary.json").read_bytes())


async def test_planted_behaviours_are_found_and_validated(kafka_bootstrap, redis_url, unique, tmp_run_dir):
    cfg = _cfg(unique, tmp_run_dir, null=False, seed=0, max_texts=8000)
    summary = await _run(cfg, kafka_bootstrap, redis_url)
    gt = summary["ground_truth"]
    assert set(gt["planted"]) == {"cats", "disclaimer", "sailing", "moon"}
    assert gt["missed"] == [], f"missed planted behaviours: {gt['missed']}"
    findings = [r for r in _results(cfg) if r["decision"] == "validated"]
    # every finding is a real planted difference: the majority of its cluster's texts carry it
    assert findings and all(r.get("purity_behaviour") in gt["planted"] for r in findings), findings
    # and its words say it (ground truth by meaning): the offline labeler's keyword lists on hashing-embedded
    # clusters sometimes name the behaviour's context words instead (a true cats cluster labelled
    # "cushion, sofa, nap" sits at cosine ~0.43), so this bar is below 1 (seeds measured: 0.75-1.0)
    assert gt["precision"] >= 0.7, [(r["text"][:90], r.get("matched_behaviour")) for r in findings]
    assert summary["texts"]["by_role"]["base"] == summary["texts"]["by_role"]["intervention"]  # paired


async def test_null_run_validates_nothing(kafka_bootstrap, redis_url, unique, tmp_run_dir):
    # one run can only fail by chance with probability <= alpha (many seeds: test_null_and_planted.py);
    # alpha 0.01 keeps this single end-to-end check from being a 1-in-20 flake by design
    cfg = _cfg(unique, tmp_run_dir, null=True, seed=1, max_texts=4000, alpha=0.01)
    summary = await _run(cfg, kafka_bootstrap, redis_url)
    assert summary["texts"]["total"] >= 3000
    assert summary["validated"] == []


def _results(cfg: Config) -> list[dict]:
    path = Path(cfg.experiment.run_dir) / cfg.experiment_id / "results.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
