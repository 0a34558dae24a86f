"""The trusted path for findings: a validator judges held-out texts only as the generator recorded them.

Anyone who can write to the bus can send a Hypothesis whose "held-out" texts say whatever the claim
needs (issue 12: a forged hypothesis came out validated, rank 1).  These tests send such messages
through the real validator (real Redis; the last one over the real broker with the real generator)
and check that the decision follows the text store, never the message:

* ids the store never recorded are dropped; with too few trusted texts the hypothesis is rejected
  at the first tier, nothing scored, nothing escalated;
* real ids whose text or role the message altered are judged on the stored text and role, in both
  directions (a forged "for" is rejected, a forged "against" still validates);
* ids the labeler saw, and ids on the label side of the split, are dropped and counted;
* the generator records every text it emits (idempotently, with the state TTL) before emitting it,
  and emits nothing when Redis does not answer.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from service_helpers import CapturingValidator, offline_context, read_records, running, split_id, store_texts

from services.clusterer.arrivals import is_label_split
from services.core.bus import Producer, Topics, ensure_topics
from services.core.config import Config, load_config
from services.core.events import (
    DecodedText,
    Event,
    GenerationRequest,
    Hypothesis,
    PromptRef,
    TextRef,
    Validation,
    stable_id,
)
from services.core.faults import REDIS_ERRORS
from services.core.metrics import Metrics
from services.core.runtime import Incoming, ServiceContext
from services.core.text_store import TextStore, text_store_key
from services.generator.service import GeneratorService
from services.paired.pairs import is_label_pair
from services.validator.service import ValidatorService
from services.validator.trusted import trusted_holdout

CLAIM = "The intervention model writes about a tiny purple dragon."
WITH = "a tiny purple dragon flew over the hill"
WITHOUT = "the weather stayed calm over the hill"
N = 30  # held-out texts per side
TTL = 3600


def _cfg(unique: str, **over: object) -> Config:
    base: dict[str, object] = {
        "experiment": {"id": f"trust-{unique}"}, "cache": {"namespace": f"tr{unique}", "state_ttl_s": TTL},
        "embedder": {"backend": "hashing"}, "observability": {"metrics_port": None},
        "validator": {"tiers": [{"name": "keyword", "kind": "keyword"}, {"name": "embedding", "kind": "embedding"}]},
        **over}
    return load_config(None, environ={}, overrides=base)


def _refs(tag: str, role: str, texts: list[str], *, label: bool = False) -> list[TextRef]:
    return [TextRef(text_id=split_id(tag, role, i, label=label), prompt_id=f"p{i}", role=role, text=t)  # type: ignore[arg-type]
            for i, t in enumerate(texts)]


def _hypothesis(hid: str, holdout: list[TextRef], label_ids: list[str] | None = None) -> Hypothesis:
    return Hypothesis(experiment_id="x", hypothesis_id=hid, candidate_id="c", cluster_id=0, direction="intervention",
                      text=CLAIM, labeler="test", keywords=["dragon"], label_text_ids=label_ids or [],
                      holdout_texts=holdout)


async def _validate(cfg: Config, redis_url: str, *hyps: Hypothesis) -> dict[str, Validation]:
    """The first tier's validation of each hypothesis, through the service's own handle()."""
    svc = CapturingValidator(offline_context(cfg, redis_url))
    async with running(svc):
        await svc.handle([Incoming(h, None) for h in hyps])
    out = {e.hypothesis_id: e for e in svc.out if isinstance(e, Validation)}
    assert set(out) == {h.hypothesis_id for h in hyps}
    return out


def _supporting(tag: str) -> list[TextRef]:
    return _refs(tag, "intervention", [f"{WITH}, note {i}" for i in range(N)]) + \
        _refs(tag, "base", [f"{WITHOUT}, note {i}" for i in range(N)])


async def test_forged_held_out_ids_are_dropped_and_the_hypothesis_rejected(redis_url: str, unique: str) -> None:
    cfg = _cfg(unique)
    forged = _hypothesis("forged", _supporting("forged"))  # never generated: not in the store
    real = _hypothesis("real", _supporting("real"))  # the same claim and evidence, recorded
    # a share statement with overwhelming share evidence in the message: evidence is display only
    share = forged.model_copy(update={"hypothesis_id": "share", "kind": "templated", "cluster_evidence": {
        "share_intervention": 1.0, "share_ci_low": 0.99, "share_ci_high": 1.0, "log_e_value": 700.0, "n": 1e6}})
    await store_texts(cfg, redis_url, real.holdout_texts)
    v = await _validate(cfg, redis_url, forged, real, share)
    assert v["share"].decision == "rejected" and v["share"].effect["too_few_texts"] == 1.0

    f = v["forged"]
    assert f.decision == "rejected" and f.tier_index == 0  # not escalated: no tier can do better
    assert f.effect["too_few_texts"] == 1.0 and f.effect["dropped_unknown_id"] == 2 * N
    assert f.effect["dropped_untrusted"] == 2 * N and (f.n_pos, f.n_neg, f.calls) == (0, 0, 0)
    assert f.alpha_level == 0.0  # no test was run, no alpha spent

    r = v["real"]  # what makes the forgery fail is the store alone
    assert r.decision == "validated" and (r.n_pos, r.n_neg) == (N, N) and r.effect["dropped_untrusted"] == 0


async def test_altered_texts_and_roles_are_judged_on_the_stored_text(redis_url: str, unique: str) -> None:
    cfg = _cfg(unique)
    # stored: no side mentions the dragon; the message puts it into every intervention text
    plain = _refs("plain", "intervention", [f"{WITHOUT}, entry {i}" for i in range(N)]) + \
        _refs("plain", "base", [f"{WITHOUT}, note {i}" for i in range(N)])
    await store_texts(cfg, redis_url, plain)
    doctored = [t.model_copy(update={"text": f"{WITH} {i}"}) if t.role == "intervention" else t
                for i, t in enumerate(plain)]
    # stored: the claim holds; the message blanks the dragon out and swaps every role
    holds = _supporting("holds")
    await store_texts(cfg, redis_url, holds)
    swapped = [t.model_copy(update={"text": WITHOUT, "role": "base" if t.role == "intervention" else "intervention"})
               for t in holds]
    v = await _validate(cfg, redis_url, _hypothesis("doctored", doctored), _hypothesis("swapped", swapped))

    assert v["doctored"].decision != "validated" and v["doctored"].auc == 0.5
    assert v["doctored"].effect["altered_in_message"] == N
    assert v["swapped"].decision == "validated" and v["swapped"].auc == 1.0
    assert (v["swapped"].n_pos, v["swapped"].n_neg) == (N, N)  # the stored roles, not the message's
    assert v["swapped"].effect["altered_in_message"] == 2 * N


async def test_label_texts_smuggled_into_the_holdout_are_dropped(redis_url: str, unique: str) -> None:
    cfg = _cfg(unique)
    neutral = _refs("neutral", "intervention", [f"{WITHOUT}, entry {i}" for i in range(N)]) + \
        _refs("neutral", "base", [f"{WITHOUT}, note {i}" for i in range(N)])
    seen = _refs("seen", "intervention", [f"{WITH} {i}" for i in range(20)])  # held-out side, but the labeler saw them
    split = _refs("split", "intervention", [f"{WITH} {i}" for i in range(20)], label=True)  # label side of the split
    await store_texts(cfg, redis_url, neutral + seen + split)
    holdout = seen + split + neutral + neutral[:5]  # five ids named twice
    v = (await _validate(cfg, redis_url, _hypothesis("smuggled", holdout, [t.text_id for t in seen])))["smuggled"]

    assert v.effect["dropped_label_id"] == 20 and v.effect["dropped_label_split"] == 20
    assert v.effect["dropped_duplicate_id"] == 5 and v.effect["dropped_untrusted"] == 45
    assert (v.n_pos, v.n_neg) == (N, N) and v.auc == 0.5 and v.decision != "validated"


async def test_paired_holdouts_follow_the_stored_pair_split(redis_url: str, unique: str) -> None:
    cfg = _cfg(unique)
    fraction = cfg.paired.label_fraction
    pairs = [stable_id("pair", unique, i) for i in range(40)]
    stored = [TextRef(text_id=stable_id(p, role), prompt_id="p", role=role, text=f"{role} {p}", pair_id=p)  # type: ignore[arg-type]
              for p in pairs for role in ("base", "intervention")]
    lone = TextRef(text_id=stable_id("lone", unique), prompt_id="p", role="base", text="no partner")
    await store_texts(cfg, redis_url, [*stored, lone])
    # the message claims every pair is held out and gives them pair ids of its own choosing
    claimed = [t.model_copy(update={"pair_id": "forged-pair"}) for t in stored] + [lone]
    h = _hypothesis("paired", claimed).model_copy(update={"kind": "paired", "candidate_id": "paired:x",
                                                           "cluster_id": -1})
    client = aioredis.Redis.from_url(redis_url)
    try:
        got = await trusted_holdout(h, TextStore(client, cfg, cfg.experiment_id), cfg)
    finally:
        await client.aclose()
    held = [p for p in pairs if not is_label_pair(p, fraction)]
    assert 0 < len(held) < len(pairs)
    assert [t.pair_id for t in got.texts] == [p for p in held for _ in range(2)]  # stored pair ids, both texts
    assert got.label_split == 2 * (len(pairs) - len(held)) + 1 and got.unknown == 0  # + the unpaired text


class CapturingGenerator(GeneratorService):
    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.out: list[Event] = []

    async def emit(self, event: Event, topic: str | None = None) -> None:
        self.out.append(event)


def _request(cfg: Config, role: str) -> GenerationRequest:
    return GenerationRequest(experiment_id=cfg.experiment_id, role=role, pair_id="req-pair", n_per_prompt=3,  # type: ignore[arg-type]
                             prompts=[PromptRef(prompt_id=f"p{i}", text="Write about tea.") for i in range(4)])


async def test_the_generator_records_every_text_before_emitting_it(redis_url: str, unique: str) -> None:
    cfg = _cfg(unique)
    gen = CapturingGenerator(offline_context(cfg, redis_url))
    base, intervention = _request(cfg, "base"), _request(cfg, "intervention")
    async with running(gen):
        await gen.handle([Incoming(base, None), Incoming(intervention, None)])
        texts = [e for e in gen.out if isinstance(e, DecodedText)]
        await gen.handle([Incoming(base, None)])  # a re-delivered request
    assert len(texts) == 24
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = TextStore(client, cfg, cfg.experiment_id)
        got = await store.fetch([t.text_id for t in texts] + ["never-generated"])
        assert await client.hlen(store.key) == 24  # the re-delivery rewrote the same ids
        assert 0 < await client.ttl(store.key) <= TTL
    finally:
        await client.aclose()
    assert set(got) == {t.text_id for t in texts}
    for t in texts:
        s = got[t.text_id]
        assert (s.role, s.prompt_id, s.pair_id, s.text) == (t.role, t.prompt_id, t.pair_id, t.text)
    assert len({t.pair_id for t in texts}) == 12  # both roles' k-th answer to a prompt share a pair id


async def test_the_generator_emits_nothing_it_could_not_record(unique: str) -> None:
    cfg = _cfg(unique, cache={"namespace": f"tr{unique}", "url": "redis://127.0.0.1:1/0"})
    gen = CapturingGenerator(offline_context(cfg, "redis://127.0.0.1:1/0"))  # nothing listens there
    async with running(gen):
        with pytest.raises(REDIS_ERRORS):  # an infrastructure error: the runtime rewinds and retries the batch
            await gen.handle([Incoming(_request(cfg, "base"), None)])
    assert not [e for e in gen.out if isinstance(e, DecodedText)]


async def test_forgeries_on_the_real_broker_never_validate(kafka_bootstrap: str, redis_url: str, unique: str) -> None:
    """Generator and validator as services on the real broker: the validator rejects a hypothesis
    naming texts nobody generated, and one naming generated texts with the claim written into them."""
    cfg = load_config(None, environ={"KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url}, overrides={
        "experiment": {"id": f"trust-bus-{unique}"}, "bus": {"topic_prefix": f"tb-{unique}", "partitions": 2},
        "cache": {"namespace": f"tb{unique}"}, "observability": {"metrics_port": None},
        "validator": {"tiers": [{"name": "keyword", "kind": "keyword"}]}})
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    services = [GeneratorService(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics)),
                ValidatorService(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics))]
    tasks = [asyncio.create_task(s.run()) for s in services]
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "attacker")
    await prod.start()
    try:
        for role in ("base", "intervention"):
            await prod.send(_request(cfg, role).model_copy(update={"n_per_prompt": 10}))
        await prod.flush()
        texts = [DecodedText.from_bytes(r.value) for r in await read_records(cfg, kafka_bootstrap, "texts", 80)]
        assert len(texts) == 80
        held = [TextRef(text_id=t.text_id, prompt_id=t.prompt_id, role=t.role, text=t.text) for t in texts
                if not is_label_split(t.text_id, cfg.clusterer.label_fraction)]
        doctored = [t.model_copy(update={"text": WITH}) if t.role == "intervention" else t for t in held]
        assert min(sum(t.role == r for t in held) for r in ("base", "intervention")) >= 10
        forged = [t.model_copy(update={"text_id": f"forged-{i}"}) for i, t in enumerate(doctored)]
        for hid, refs in (("doctored", doctored), ("forged", forged)):
            await prod.send(_hypothesis(hid, refs).model_copy(update={"experiment_id": cfg.experiment_id}))
        await prod.flush()
        got = [Validation.from_bytes(r.value) for r in await read_records(cfg, kafka_bootstrap, "validations", 2)]
    finally:
        await prod.stop()
        for s in services:
            s.stop()
        await asyncio.gather(*tasks)
    v = {x.hypothesis_id: x for x in got}
    assert v["forged"].decision == "rejected" and v["forged"].effect["dropped_unknown_id"] == len(forged)
    assert v["doctored"].decision != "validated" and v["doctored"].effect["dropped_untrusted"] == 0
    assert v["doctored"].effect["altered_in_message"] == sum(t.role == "intervention" for t in held)


def test_the_store_is_per_experiment_state() -> None:
    from services.core.state import state_key_pattern

    assert state_key_pattern("ai", "e1").match(text_store_key("ai", "e1"))
    assert not state_key_pattern("ai", "e1").match(text_store_key("ai", "e10"))
