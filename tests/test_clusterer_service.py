"""The clusterer service on the real broker and Redis: bad vectors, a failing batch, a Redis outage
and a corrupt saved state (each of these once lost texts, poisoned the state or ended the service,
issue 12), and results that do not depend on how deliveries were cut."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from service_helpers import offline_context, read_records, running

from services.clusterer.pairing import PairBuffer
from services.clusterer.service import ClustererService
from services.clusterer.state import ClusterState, CorruptStateError, IngestResult, decode_vectors
from services.core.bus import Producer, Topics, ensure_topics, group_lag
from services.core.config import Config, load_config
from services.core.events import DeadLetter, EmbeddedText
from services.core.infra import EmbeddedCache
from services.core.metrics import Metrics
from services.core.runtime import Incoming, ServiceContext

DIM = 32


def _cfg(unique: str, bootstrap: str, redis_url: str, **clusterer: object) -> Config:
    over = {"experiment": {"id": f"exp-{unique}"}, "bus": {"topic_prefix": f"t-{unique}", "partitions": 1},
            "cache": {"namespace": f"ns-{unique}"}, "observability": {"metrics_port": None},
            "clusterer": {"warmup": 40, "k_initial": 4, "k_max": 6, "snapshot_every_s": 0.2,
                          "snapshot_every_n": 50, "split_every": 500, **clusterer}}
    return load_config(None, environ={"KAFKA_BOOTSTRAP": bootstrap, "REDIS_URL": redis_url}, overrides=over)


def _pairs(cfg: Config, n_pairs: int, seed: int = 0, start: int = 0) -> list[EmbeddedText]:
    """Paired texts: for pair i, the base text then the intervention text (unit vectors, 6 blobs)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, DIM))
    out = []
    for i in range(start, start + n_pairs):
        for role in ("base", "intervention"):
            v = centres[i % 6] + 0.3 * rng.standard_normal(DIM)
            out.append(EmbeddedText(
                experiment_id=cfg.experiment_id, text_id=f"{i:08x}-{role}", pair_id=f"{i:08x}", role=role,
                prompt_id=f"q{i % 7}", text=f"text {i} {role}", embedding_model="test", dim=DIM,
                dtype="float32", vector_b64=EmbeddedText.encode_vector(v / np.linalg.norm(v), "float32")))
    return out


def _poisoned(good: EmbeddedText, text_id: str, **change: object) -> bytes:
    """The JSON of ``good`` with fields changed, bypassing validation (as a buggy producer would)."""
    return orjson.dumps({**good.model_dump(mode="json"), "text_id": text_id, "pair_id": "", **change})


def _nan_b64() -> str:
    v = np.ones(DIM, np.float32)
    v[3] = np.nan
    return EmbeddedText.encode_vector(v, "float32")


POISON: dict[str, dict[str, object]] = {
    "nan": {"vector_b64": _nan_b64()},
    "short": {"vector_b64": EmbeddedText.encode_vector(np.ones(DIM - 5), "float32")},
    "not-base64": {"vector_b64": "!!!!" + "A" * 100},
    "other-dim": {"dim": 16, "vector_b64": EmbeddedText.encode_vector(np.ones(16) / 4, "float32")},
}


async def _until(cond: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _committed(bootstrap: str, group: str, topic: str) -> int:
    return sum(p.committed or 0 for p in await group_lag(bootstrap, group, [topic]))


def _assert_finite(state_bytes: bytes, cfg: Config) -> ClusterState:
    st = ClusterState.from_bytes(state_bytes, cfg.clusterer)  # raises CorruptStateError on NaN
    assert np.isfinite(st.engine.centroids).all()
    return st


# ----------------------------------------------------------------------------- validation at the edge


def test_bad_vectors_fail_validation_with_a_reason() -> None:
    good = _pairs(load_config(None, environ={}), 1)[0]
    for name, reason in (("nan", "non-finite"), ("short", "bytes"), ("not-base64", "base64"),
                         ("other-dim", None)):
        raw = _poisoned(good, name, **POISON[name])
        if reason is None:
            assert EmbeddedText.from_bytes(raw).vector().shape == (16,)  # sound on its own
            continue
        with pytest.raises(ValidationError, match=reason):
            EmbeddedText.from_bytes(raw)
        bad = good.model_copy(update={k: v for k, v in POISON[name].items()})  # skips validation
        with pytest.raises(ValueError, match=reason):
            bad.vector()
        with pytest.raises(ValueError, match=f"text {good.text_id}: .*{reason}"):
            decode_vectors([good, bad])


def test_state_refuses_non_finite_rows_and_stays_unchanged() -> None:
    cfg = load_config(None, environ={}, overrides={"clusterer": {"warmup": 40, "k_initial": 4}})
    events = _pairs(cfg, 60)
    st = ClusterState(cfg.clusterer, "exp")
    st.ingest(events[:100])
    before = st.to_bytes()
    X = np.stack([e.vector() for e in events[100:]])
    X[5, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        st.ingest_arrays([e.text_id for e in events[100:]], [e.prompt_id for e in events[100:]],
                         [e.role for e in events[100:]], [e.text for e in events[100:]], X)
    assert st.to_bytes() == before and not st.has_seen(events[100].text_id)


async def test_poison_records_are_dead_lettered_and_touch_no_state(kafka_bootstrap, redis_url, unique):
    """Bad vectors mixed into batches whose texts complete pairs waiting in the buffer: every bad
    one is dead-lettered, every good text is clustered (none lost with a failed batch), and no NaN
    reaches the saved state."""
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 1, 1)
    events = _pairs(cfg, 120)
    base, inter = events[0::2], events[1::2]
    svc = ClustererService(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics))
    task = asyncio.create_task(svc.run())
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    try:
        for e in base:  # all wait for their partners
            await prod.send(e)
        await prod.flush()
        await _until(lambda: hasattr(svc, "pairs") and len(svc.pairs) == len(base), "base texts buffered")
        emb = topics.name(EmbeddedText.topic)
        for i, e in enumerate(inter):  # partners, with a poison record every 30 texts
            await prod.send(e)
            if i % 30 == 15:
                name = list(POISON)[(i // 30) % len(POISON)]
                await prod.send_raw(emb, _poisoned(e, f"poison-{name}", **POISON[name]), key=b"k")
        await prod.flush()
        await _until(lambda: int(svc.state.role_totals.sum()) == len(events), "every good text clustered")
        dead = await read_records(cfg, kafka_bootstrap, DeadLetter.topic, len(POISON))
    finally:
        await prod.stop()
        svc.stop()
        await task
    letters = [DeadLetter.from_bytes(r.value) for r in dead]
    reasons = " | ".join(dl.reason for dl in letters)
    assert len(letters) == len(POISON), reasons
    for needle in ("non-finite", "bytes", "base64", "dim 16"):
        assert needle in reasons, reasons
    assert svc.state.role_totals.tolist() == [len(base), len(inter)]  # no partner lost, no role biased
    assert len(svc.pairs) == 0
    assert not any(svc.state.has_seen(f"poison-{name}") for name in POISON)
    async with aioredis.Redis.from_url(redis_url) as r:
        saved = await r.get(svc.k_state)
    assert int(_assert_finite(saved, cfg).role_totals.sum()) == len(events)  # drain saved it all


async def test_a_failing_batch_leaves_the_pair_buffer_as_it_was(redis_url, unique):
    """Any ingest failure (here injected once): the buffer and state are unchanged, so the
    record-by-record retry pairs and ingests every text."""
    cfg = _cfg(unique, "127.0.0.1:1", redis_url)
    events = _pairs(cfg, 30)
    svc = ClustererService(offline_context(cfg, redis_url))
    async with running(svc):
        await svc.handle([Incoming(e, None) for e in events[0:40:2]])  # 20 base texts wait
        waiting = dict(svc.pairs.waiting)
        real_ingest, calls = svc.state.ingest, []

        def failing_once(items: list[EmbeddedText]) -> IngestResult:
            calls.append(len(items))
            if len(calls) == 1:
                raise RuntimeError("injected failure")
            return real_ingest(items)

        svc.state.ingest = failing_once  # type: ignore[method-assign]
        batch = [Incoming(e, None) for e in events[1:40:2] + events[40:]]
        with pytest.raises(RuntimeError):
            await svc.handle(batch)
        assert svc.pairs.waiting == waiting and int(svc.state.role_totals.sum()) == 0
        for item in batch:  # what the runtime does after a failed batch
            await svc.handle([item])
    assert svc.state.role_totals.tolist() == [30, 30] and len(svc.pairs) == 0


def test_pair_plan_does_not_touch_the_buffer() -> None:
    cfg = load_config(None, environ={})
    ev = _pairs(cfg, 3)
    buf = PairBuffer(wait_texts=3)
    buf.commit(buf.plan(ev[0:6:2], lambda _: False))
    snapshot = (dict(buf.waiting), buf.arrivals)
    plan = buf.plan(ev[1:6:2], lambda _: False)
    assert (buf.waiting, buf.arrivals) == snapshot
    assert sorted(e.text_id for e in plan.ready) == sorted(e.text_id for e in ev) and not plan.waiting
    expiring = buf.plan(_pairs(cfg, 4, start=10)[0:8:2], lambda _: False)  # 4 more arrivals: all expire
    assert {e.text_id for e in expiring.ready} == {e.text_id for e in ev[0:6:2]}


# ----------------------------------------------------------------------------- Redis outage


@pytest.mark.slow
async def test_redis_outage_holds_commits_and_recovers(kafka_bootstrap, tmp_path: Path, unique):
    cache = EmbeddedCache(tmp_path / "valkey").start()
    cfg = _cfg(unique, kafka_bootstrap, cache.url)
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 1, 1)
    group, emb = f"{cfg.bus.topic_prefix}.{cfg.experiment_id}.clusterer", topics.name(EmbeddedText.topic)
    events = _pairs(cfg, 300)
    svc = ClustererService(ServiceContext(cfg, kafka_bootstrap, cache.url, Metrics(), topics))
    task = asyncio.create_task(svc.run())
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    try:
        for e in events[:300]:
            await prod.send(e)
        await prod.flush()
        await _until_async(lambda: _committed(kafka_bootstrap, group, emb), 300, "first commits")
        cache.stop()
        for e in events[300:]:
            await prod.send(e)
        await prod.flush()
        await _until(lambda: int(svc.state.role_totals.sum()) == len(events), "texts clustered during outage")
        await _until(lambda: svc.save_failures >= 3, "several failed saves")
        assert not task.done(), "the outage ended the clusterer"
        assert await _committed(kafka_bootstrap, group, emb) == 300  # nothing committed without a save
        cache = EmbeddedCache(tmp_path / "valkey", port=cache.port).start()
        await _until_async(lambda: _committed(kafka_bootstrap, group, emb), len(events), "commits after recovery",
                           timeout_s=90)
        async with aioredis.Redis.from_url(cache.url) as r:
            saved = await r.get(svc.k_state)
        assert int(_assert_finite(saved, cfg).role_totals.sum()) == len(events)
    finally:
        await prod.stop()
        svc.stop()
        await task
        cache.stop()


async def _until_async(get: Callable[[], object], at_least: int, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    got = -1
    while time.monotonic() < deadline:
        got = await get()  # type: ignore[misc]
        if got >= at_least:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {got} < {at_least}")


# ----------------------------------------------------------------------------- corrupt saved state


async def test_corrupt_saved_state_is_moved_aside_and_ids_continue(redis_url, unique):
    cfg = _cfg(unique, "127.0.0.1:1", redis_url)
    events = _pairs(cfg, 60)
    st = ClusterState(cfg.clusterer, cfg.experiment_id)
    st.ingest(events)
    st.snapshot()
    st.engine._centroids[0, 0] = np.nan  # as an older version could save it
    data = st.to_bytes()
    with pytest.raises(CorruptStateError, match=r"NaN or inf in engine\.centroids"):
        ClusterState.from_bytes(data, cfg.clusterer)
    with pytest.raises(CorruptStateError, match="does not read back"):
        ClusterState.from_bytes(base64.b64encode(data)[:500], cfg.clusterer)
    svc = ClustererService(offline_context(cfg, redis_url))
    async with aioredis.Redis.from_url(redis_url) as r:
        await r.set(f"{cfg.cache.namespace}:clusterer:{cfg.experiment_id}:state", data)
        async with running(svc):
            assert int(svc.state.role_totals.sum()) == 0 and svc.state.seq == st.seq
            await svc.handle([Incoming(e, None) for e in _pairs(cfg, 60, seed=1, start=100)])
            assert min(svc.state.engine.ids) >= st.engine.n_created  # no id (nor its alpha) reused
            await svc._save()
        moved = [k async for k in r.scan_iter(f"{svc.k_state}:quarantined:*")]
        assert len(moved) == 1 and await r.get(moved[0]) == data
        restored = _assert_finite(await r.get(svc.k_state), cfg)
    assert int(restored.role_totals.sum()) == 120


# ----------------------------------------------------------------------------- batch cuts


class CapturingClusterer(ClustererService):
    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.out: list = []

    async def emit(self, event, topic: str | None = None) -> None:
        self.out.append(event)


async def test_service_output_does_not_depend_on_delivery_cuts(redis_url, unique):
    """Pairs arriving out of order, partners that never come (expired after pair_wait_texts) and
    re-deliveries, cut into deliveries three ways: the same events and the same state bytes."""
    rng = np.random.default_rng(5)
    cfg0 = _cfg(unique, "127.0.0.1:1", redis_url)
    events = _pairs(cfg0, 400)
    for i in range(0, len(events), 2):  # a third of the intervention texts show one topic
        if rng.random() < 0.33:
            events[i + 1] = events[i + 1].model_copy(update={"vector_b64": events[4 * 6].vector_b64})
    order = rng.permutation(len(events))
    order = order[rng.random(len(order)) > 0.03]  # some partners never arrive
    stream = [events[i] for i in order]
    stream = stream[:300] + stream[250:300] + stream[300:]  # a re-delivered stretch

    async def run(sizes: list[int], tag: str) -> tuple[list, bytes, dict]:
        cfg = _cfg(f"{unique}{tag}", "127.0.0.1:1", redis_url, pair_wait_texts=40, check_every=32,
                   uncertainty_every=200)
        svc = CapturingClusterer(offline_context(cfg, redis_url))
        async with running(svc):
            at = 0
            for size in sizes:
                await svc.handle([Incoming(e, None) for e in stream[at:at + size]])
                at += size
            assert at >= len(stream)
        # per topic (candidates, uncertainty): the order that matters to consumers
        out = sorted(svc.out, key=lambda e: e.topic)
        volatile = ("created_at", "experiment_id", "candidate_id", "uncertainty_id")
        return ([{k: v for k, v in e.model_dump(mode="json").items() if k not in volatile} for e in out],
                svc.state.to_bytes(), svc.pairs.to_json())

    whole = await run([len(stream)], "a")
    assert any("direction" in e for e in whole[0]) and any("kind" in e for e in whole[0])
    for tag, sizes in (("b", [37] * 30), ("c", rng.integers(1, 120, 60).tolist())):
        got = await run(sizes, tag)
        assert got[0] == whole[0] and got[2] == whole[2]
        assert _state_without_experiment(got[1]) == _state_without_experiment(whole[1])


def _state_without_experiment(data: bytes) -> tuple:
    from services.clusterer import persist

    arrays, meta = persist.read(data)
    meta = {k: v for k, v in meta.items() if k not in ("experiment_id", "tracker")}
    return sorted((k, v.tobytes()) for k, v in arrays.items()), orjson.dumps(meta, option=orjson.OPT_SORT_KEYS)


async def test_snapshot_numbers_are_never_reused_after_a_restart(redis_url: str, unique: str) -> None:
    """A clusterer that dies after publishing snapshots it had not saved yet restarts from its last
    save; its next snapshot must get a new number (the sink keeps one snapshot per number, so a reused
    number with other content would leave it showing a stale one)."""
    cfg = _cfg(unique, "127.0.0.1:1", redis_url, snapshot_every_n=100_000, snapshot_every_s=3600)
    events = _pairs(cfg, 300)
    published: list = []
    async with running(ClustererService(offline_context(cfg, redis_url))) as first:  # no drain: a crash
        await first.handle([Incoming(e, None) for e in events[:200]])
        await first._save()  # the last save comes before any snapshot
        first.emit = _collect(published)  # type: ignore[method-assign]
        await first._emit_snapshot()
        await first._emit_snapshot()
    again: list = []
    second = ClustererService(offline_context(cfg, redis_url))
    async with running(second):
        second.emit = _collect(again)  # type: ignore[method-assign]
        await second._emit_snapshot()
    seqs = [s.seq for s in published]
    assert seqs == [1, 2] and again[0].seq == 3, (seqs, again[0].seq)


def _collect(into: list) -> Callable:
    async def emit(event, topic=None) -> None:
        into.append(event)

    return emit
