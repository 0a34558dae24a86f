"""Per-experiment Redis state expires (``cache.state_ttl_s``, refreshed on every write) and
``autointerv clean`` deletes exactly one experiment's keys; the shared caches survive both.
Also: generation seeds come from the experiment's seed and name, not its timestamped id, so a
rerun of the same config samples the same texts (and hits the embedding cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from service_helpers import CapturingValidator, offline_context, running

from services.cli import main
from services.clusterer.service import ClustererService
from services.controller.service import ControllerService
from services.core.config import Config, load_config
from services.core.events import Event, GenerationRequest, Hypothesis, TextRef, stable_id
from services.core.runtime import Incoming
from services.core.state import clean_experiment, experiment_keys
from services.generator.backends import make_backend
from services.generator.service import GeneratorService
from services.llm.factory import make_budget

TTL = 3600


def _cfg(unique: str, exp: str = "exp", name: str = "demo", **over: object) -> Config:
    return load_config(None, environ={}, overrides={
        "experiment": {"id": f"{exp}-{unique}", "name": name},
        "cache": {"namespace": f"st{unique}", "state_ttl_s": TTL}, **over})


class CapturingController(ControllerService):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.out: list[Event] = []

    async def emit(self, event: Event, topic: str | None = None) -> None:
        self.out.append(event)


async def _ttls(redis_url: str, namespace: str, experiment: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = await experiment_keys(client, namespace, experiment)
        return {k: await client.ttl(k) for k in keys}
    finally:
        await client.aclose()


def _hypothesis(exp: str) -> Hypothesis:
    pos = [f"note {i} about a kitten" for i in range(30)]
    neg = [f"note {i} about the weather" for i in range(30)]
    refs = ([TextRef(text_id=stable_id("p", i), prompt_id="p", role="intervention", text=t) for i, t in enumerate(pos)]
            + [TextRef(text_id=stable_id("n", i), prompt_id="p", role="base", text=t) for i, t in enumerate(neg)])
    return Hypothesis(experiment_id=exp, hypothesis_id="h1", candidate_id="c1", cluster_id=0,
                      direction="intervention", text="The intervention model mentions kittens.", labeler="test",
                      keywords=["kitten"], holdout_texts=refs)


async def test_every_stateful_service_sets_the_state_ttl(redis_url, unique):
    cfg = _cfg(unique)
    exp, ns = cfg.experiment_id, cfg.cache.namespace
    async with running(CapturingController(offline_context(cfg, redis_url))) as ctl:
        assert any(isinstance(e, GenerationRequest) for e in ctl.out)  # the initial round was planned and saved
    async with running(ClustererService(offline_context(cfg, redis_url))) as clu:
        await clu._save()
    async with running(CapturingValidator(offline_context(cfg, redis_url))) as val:
        await val.handle([Incoming(_hypothesis(exp), None)])
        assert val.out
    client = aioredis.Redis.from_url(redis_url)
    try:
        budget = make_budget(1.0, redis=client, namespace=ns, experiment_id=exp, ttl_s=cfg.cache.state_ttl_s)
        await budget.reserve(0.01)
    finally:
        await client.aclose()
    ttls = await _ttls(redis_url, ns, exp)
    kinds = {k.split(":")[1] for k in ttls}
    assert {"controller", "clusterer", "lord", "decided", "budget"} <= kinds, ttls
    assert all(0 < t <= TTL for t in ttls.values()), ttls  # -1 would be "never expires"


async def test_clean_deletes_one_experiment_and_nothing_else(redis_url, unique):
    ns = f"cl{unique}"
    client = aioredis.Redis.from_url(redis_url)
    mine = [f"{ns}:controller:demo-1", f"{ns}:clusterer:demo-1:state", f"{ns}:lord:demo-1:keyword",
            f"{ns}:lord:demo-1:keyword:lock", f"{ns}:decided:demo-1:embedding", f"{ns}:budget:demo-1",
            f"{ns}:endpoints:demo-1"]
    others = [f"{ns}:controller:demo-10", f"{ns}:controller:demo-1x", f"{ns}:lord:keyword:demo-1",
              f"{ns}:lord:other:keyword", f"{ns}:llm:v1:demo-1", f"{ns}:emb:demo-1:abc", f"x{ns}:controller:demo-1"]
    try:
        for k in mine + others:
            await client.set(k, b"1")
        # the position names the experiment: tier "keyword" of demo-1 is not experiment "keyword"
        assert await experiment_keys(client, ns, "keyword") == [f"{ns}:lord:keyword:demo-1"]
        assert sorted(await clean_experiment(client, ns, "demo-1")) == sorted(mine)
        assert await client.exists(*mine) == 0 and await client.exists(*others) == len(others)
    finally:
        await client.delete(*others)
        await client.aclose()


def test_clean_command_deletes_state_and_run_dir(redis_url, unique, tmp_path, monkeypatch, capsys):
    ns = f"cc{unique}"
    exp = f"demo-{unique}"
    run = tmp_path / "runs" / exp
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (tmp_path / "runs" / "latest").symlink_to(exp)
    import redis

    client = redis.Redis.from_url(redis_url)
    client.set(f"{ns}:controller:{exp}", b"1")
    monkeypatch.setenv("REDIS_URL", redis_url)
    base = ["--set", f"cache.namespace={ns}", "--set", f"experiment.run_dir={tmp_path / 'runs'}"]
    assert main(["clean", exp, "--dry-run", "--run-dir", *base]) == 0
    assert client.exists(f"{ns}:controller:{exp}") and run.is_dir()
    assert main(["clean", "latest", "--run-dir", *base]) == 0  # latest resolves through runs/latest
    assert not client.exists(f"{ns}:controller:{exp}") and not run.exists()
    assert not (tmp_path / "runs" / "latest").exists()
    assert "deleted 1 Redis keys" in capsys.readouterr().out
    assert main(["clean", "..", *base]) == 2  # never a path outside run_dir


async def _generated_texts(cfg: Config, redis_url: str) -> list[tuple[str, str, str]]:
    """(role, prompt id, text) of everything the controller's initial round asks for, generated
    by the sim backends the way the generator service does it."""
    async with running(CapturingController(offline_context(cfg, redis_url))) as ctl:
        requests = [e for e in ctl.out if isinstance(e, GenerationRequest)]
    gen = GeneratorService(offline_context(cfg, redis_url))
    backends = {r: make_backend(getattr(cfg.models, r), cfg.generator, r) for r in ("base", "intervention")}
    out = []
    for req in requests:
        result = await backends[req.role].generate(gen._tasks(req))
        out += [(req.role, g.prompt_id, g.text) for g in result.texts]
    await gen.producer.stop()
    return out


@pytest.mark.parametrize("strategy", ["active", "uniform"])
async def test_a_rerun_of_the_same_config_generates_the_same_texts(redis_url, unique, strategy):
    over = {"controller": {"strategy": strategy, "initial_texts": 200}}
    first = await _generated_texts(_cfg(unique, "run1", **over), redis_url)
    rerun = await _generated_texts(_cfg(unique, "run2", **over), redis_url)  # another (timestamped) id
    renamed = await _generated_texts(_cfg(unique, "run3", name="other", **over), redis_url)
    assert len(first) == 200 and first == rerun
    assert len({t for _, _, t in first} & {t for _, _, t in renamed}) < len(first) // 4


def test_request_ids_stay_unique_per_experiment():
    from services.controller.policy import Plan, paired_requests

    plans = [Plan("seed", n_per_prompt=1)]
    a = paired_requests("exp-a", 0, plans, "k")
    b = paired_requests("exp-b", 0, plans, "k")
    assert {r.request_id for r in a}.isdisjoint({r.request_id for r in b})
    assert [r.decoding.seed for r in a] == [r.decoding.seed for r in b]
    assert len({r.decoding.seed for r in a}) == 2  # one per role


def test_state_ttl_zero_or_none(tmp_path: Path):
    assert load_config(None, environ={}, overrides={"cache": {"state_ttl_s": None}}).cache.state_ttl_s is None
