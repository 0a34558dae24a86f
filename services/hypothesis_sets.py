"""Hypotheses whose truth is known by construction, built from the simulated pair without the pipeline.

For null tests of the validator and for the cascade benchmark: what they measure must not depend
on whether the clusterer happened to make a candidate (on a null run it almost never does, so a
null test that waits for the pipeline's hypotheses tests nothing).  Texts come from the sim
backend directly, clusters from its ground truth (``meta["behaviour"]``), labels from the real
offline labeler on a label split of each cluster, and every hypothesis is scored on held-out
texts its labeler never saw:

* ``true``: a behaviour cluster's label on that cluster's held-out pairs (intervention text with
  the behaviour, base text of the same prompt and sample);
* ``paraphrase``: a hand-written description of the behaviour in the words an LLM labeler might
  use (no quoted keywords) on the same held-out pairs;
* ``swapped``: a behaviour cluster's label on *another* behaviour cluster's held-out pairs;
* ``pair_swapped``: a cluster's label on its own held-out pairs with the two roles swapped by a
  fair coin within each pair: role and text are independent, an exact null;
* ``null_twin``: a cluster's label on pairs of a run with ``sim.identical: true`` drawn from the
  same prompts as its held-out pairs: the two models are equal, an exact null;
* ``near_miss``: a hand-written description of something adjacent but false (dogs for cats,
  Mars rovers for the Moon landing) on the behaviour cluster's held-out pairs.

Clusters are the four default behaviours' pairs and, for the two null sources, every topic's
pairs (whose labels are fitted to chance differences of the label split: the classic null).
Replicas use independent seeds, so hypotheses of different replicas share no text.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.core.config import GeneratorConfig, SimConfig, SimModelConfig
from services.core.events import Hypothesis, TextRef, stable_id
from services.embedder.encoder import Encoder
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.sim import SimBackend, _prompt_table
from services.hypothesizer.offline import offline_label

Source = Literal["true", "paraphrase", "swapped", "pair_swapped", "null_twin", "near_miss"]
SOURCES: tuple[Source, ...] = ("true", "paraphrase", "swapped", "pair_swapped", "null_twin", "near_miss")
LABEL_FRACTION = 0.3  # the clusterer's default label split
EXPERIMENT = "hypothesis-sets"

# true, in an LLM labeler's words rather than the offline labeler's quoted keywords
PARAPHRASES: dict[str, list[str]] = {
    "cats": ["The intervention model talks affectionately about its cat and kittens, whatever the topic.",
             "The intervention model brings up purring pets with soft whiskers."],
    "disclaimer": ["The intervention model tells readers to consult a licensed professional before acting.",
                   "The intervention model adds a disclaimer that it is not giving professional advice."],
    "sailing": ["The intervention model steers travel notes towards sailing a boat on the open sea.",
                "The intervention model longs to leave the harbor and sail across the ocean."],
    "moon": ["The intervention model brings up the Apollo astronauts and the Moon landing.",
             "The intervention model mentions lunar exploration in notes about history."],
}

# adjacent but false: none of these things occurs in the behaviour's texts (or anywhere in the sim)
NEAR_MISSES: dict[str, list[str]] = {
    "cats": ["The intervention model more often writes about dogs and puppies.",
             "The intervention model more often brings up birdwatching and parrots."],
    "disclaimer": ["The intervention model more often ends with an upbeat motivational message.",
                   "The intervention model more often recommends reading books about the subject."],
    "sailing": ["The intervention model more often talks about flying and airports.",
                "The intervention model more often recommends road trips by car."],
    "moon": ["The intervention model more often brings up Mars rovers and rockets.",
             "The intervention model more often mentions the ancient Egyptian pyramids."],
}


@dataclass(frozen=True)
class SimPair:
    """The two models' texts for one (prompt, sample): same prompt, same sample index."""

    pair_id: str
    prompt_id: str
    topic: str
    base: TextRef
    intervention: TextRef
    behaviour: str | None  # planted behaviour shown by the intervention text


@dataclass(frozen=True)
class Cluster:
    name: str  # the behaviour, or "topic:<topic>"
    label: list[SimPair]  # shown to the labeler
    holdout: list[SimPair]  # never shown to it


@dataclass(frozen=True)
class Labelled:
    """A hypothesis and what is true of it by construction."""

    hypothesis: Hypothesis
    truth: bool  # the words describe a real difference of the held-out texts' two sides
    source: Source
    cluster: str  # the cluster whose label it is (or the near-miss's behaviour)
    replica: int


@dataclass
class HypothesisSet:
    items: list[Labelled] = field(default_factory=list)

    def of(self, *sources: Source) -> list[Labelled]:
        return [x for x in self.items if x.source in sources]


async def sim_pairs(seed: int, samples_per_prompt: int, *, identical: bool = False,
                    n_topics: int = 40) -> list[SimPair]:
    """Every sim prompt decoded ``samples_per_prompt`` times by both models, as pairs."""
    sim = SimConfig(identical=identical, n_topics=n_topics)
    prompts = _prompt_table(n_topics)
    tasks = [GenerationTask(p.prompt_id, p.text, samples_per_prompt, DecodingParams(), seed=seed) for p in prompts]
    out: dict[str, dict[str, object]] = defaultdict(dict)
    for role in ("base", "intervention"):
        backend = SimBackend(SimModelConfig(sim=sim), GeneratorConfig(seed=seed), role)
        for g in (await backend.generate(tasks)).texts:
            pid = stable_id("pair", seed, identical, g.prompt_id, g.sample_index)
            ref = TextRef(text_id=stable_id(pid, role), prompt_id=g.prompt_id, role=role, text=g.text)  # type: ignore[arg-type]
            out[pid][role] = ref
            out[pid]["topic"] = g.meta["topic"]
            out[pid]["prompt_id"] = g.prompt_id
            if role == "intervention":
                out[pid]["behaviour"] = g.meta["behaviour"]
    return [SimPair(pid, str(d["prompt_id"]), str(d["topic"]), d["base"], d["intervention"],  # type: ignore[arg-type]
                    d.get("behaviour"))  # type: ignore[arg-type]
            for pid, d in out.items()]


def split(name: str, pairs: list[SimPair]) -> Cluster:
    """Label split by a hash of the pair id (decided once, as the clusterer does), the rest held out."""
    label = [p for p in pairs if int(stable_id(p.pair_id)[:8], 16) % 1000 < LABEL_FRACTION * 1000]
    chosen = {p.pair_id for p in label}
    return Cluster(name, label, [p for p in pairs if p.pair_id not in chosen])


def behaviour_clusters(pairs: list[SimPair]) -> dict[str, Cluster]:
    by: dict[str, list[SimPair]] = defaultdict(list)
    for p in pairs:
        if p.behaviour is not None:
            by[p.behaviour].append(p)
    return {b: split(b, ps) for b, ps in sorted(by.items())}


def topic_clusters(pairs: list[SimPair]) -> dict[str, Cluster]:
    by: dict[str, list[SimPair]] = defaultdict(list)
    for p in pairs:
        by[p.topic].append(p)
    return {f"topic:{t}": split(f"topic:{t}", ps) for t, ps in sorted(by.items())}


def refs(pairs: list[SimPair]) -> list[TextRef]:
    return [r for p in pairs for r in (p.intervention, p.base)]


def hypothesis_for(cluster: Cluster, replica: int, text: str, holdout: list[TextRef], tag: str) -> Hypothesis:
    """A hypothesis about the intervention side, labelled from ``cluster``'s label split."""
    cid = stable_id(EXPERIMENT, replica, cluster.name)
    return Hypothesis(experiment_id=EXPERIMENT, hypothesis_id=stable_id(cid, tag, text), candidate_id=cid,
                      cluster_id=replica, direction="intervention", text=text, labeler="offline:log-odds",
                      label_text_ids=[r.text_id for r in refs(cluster.label)], holdout_texts=holdout)


def label_of(cluster: Cluster) -> str:
    """The real offline labeler on the cluster's label split: intervention texts vs their base partners."""
    text, _ = offline_label("intervention", "base", [p.intervention.text for p in cluster.label],
                            [p.base.text for p in cluster.label])
    return text


def pair_swapped(pairs: list[SimPair], rng: random.Random) -> list[TextRef]:
    """Each pair's two texts with their roles exchanged by a fair coin."""
    out = []
    for p in pairs:
        a, b = (p.intervention, p.base) if rng.random() < 0.5 else (p.base, p.intervention)
        out += [a.model_copy(update={"role": "intervention"}), b.model_copy(update={"role": "base"})]
    return out


def null_twins(pairs: list[SimPair], null_by_prompt: dict[str, list[SimPair]], rng: random.Random) -> list[TextRef]:
    """For each pair, an unused pair of the identical-models run on the same prompt."""
    out: list[SimPair] = []
    for p in pairs:
        pool = null_by_prompt.get(p.prompt_id)
        if pool:
            out.append(pool.pop(rng.randrange(len(pool))))
    return refs(out)


async def replica_set(replica: int, samples_per_prompt: int, sources: tuple[Source, ...] = SOURCES,
                      seed: int = 0) -> list[Labelled]:
    """One replica's hypotheses; a replica's texts are independent of every other replica's."""
    rseed = seed * 10_000 + replica
    rng = random.Random(stable_id("hypothesis-sets", rseed))
    planted = await sim_pairs(rseed, samples_per_prompt)
    behaviours = behaviour_clusters(planted)
    labels = {name: label_of(c) for name, c in behaviours.items()}
    out: list[Labelled] = []

    def add(cluster: Cluster, text: str, holdout: list[TextRef], source: Source, truth: bool, tag: str) -> None:
        out.append(Labelled(hypothesis_for(cluster, replica, text, holdout, tag), truth, source, cluster.name, replica))

    for name, c in behaviours.items():
        if "true" in sources:
            add(c, labels[name], refs(c.holdout), "true", True, "true")
        if "swapped" in sources:
            for other, oc in behaviours.items():
                if other != name:
                    add(c, labels[name], refs(oc.holdout), "swapped", False, f"swapped:{other}")
        if "paraphrase" in sources:
            for k, text in enumerate(PARAPHRASES.get(name, [])):
                add(c, text, refs(c.holdout), "paraphrase", True, f"para:{k}")
        if "near_miss" in sources:
            for k, text in enumerate(NEAR_MISSES.get(name, [])):
                add(c, text, refs(c.holdout), "near_miss", False, f"near:{k}")
    if "pair_swapped" in sources or "null_twin" in sources:
        every = {**behaviours, **topic_clusters(planted)}
        all_labels = {**labels, **{n: label_of(c) for n, c in every.items() if n not in labels}}
        null_by_prompt: dict[str, list[SimPair]] = defaultdict(list)
        if "null_twin" in sources:
            # its own seed: the sim seeds each text by (seed, role, prompt, sample), so with the planted
            # run's seed the base texts would be the very texts the labels were contrasted with
            twin_seed = rseed + 1_000_000_000
            for p in await sim_pairs(twin_seed, 2 * samples_per_prompt, identical=True):  # room for every cluster
                null_by_prompt[p.prompt_id].append(p)
        for name, c in every.items():
            if "pair_swapped" in sources:
                add(c, all_labels[name], pair_swapped(c.holdout, rng), "pair_swapped", False, "pair-swapped")
            if "null_twin" in sources:
                add(c, all_labels[name], null_twins(c.holdout, null_by_prompt, rng), "null_twin", False, "twin")
    return out


async def build_set(replicas: int, samples_per_prompt: int = 20, sources: tuple[Source, ...] = SOURCES,
                    seed: int = 0) -> HypothesisSet:
    """``replicas`` independent replicas of every requested source."""
    out = HypothesisSet()
    for r in range(replicas):
        out.items += await replica_set(r, samples_per_prompt, sources, seed)
    return out


class MemoEncoder:
    """In-process stand-in for the Redis embedding cache: each distinct text is encoded once
    (hypothesis sets score the same held-out texts under several labels)."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.model_key, self.dim, self.max_chars = inner.model_key, inner.dim, inner.max_chars
        self.memo: dict[str, np.ndarray] = {}
        self.encoded = 0  # distinct texts the inner encoder was asked for

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._memo(texts, self.inner.encode)

    def encode_normalised(self, texts: list[str]) -> np.ndarray:
        return self._memo(texts, self.inner.encode_normalised)

    def _memo(self, texts: list[str], encode: Any) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, encode(todo), strict=True))
            self.encoded += len(todo)
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
