"""Active vs uniform sampling, per planted behaviour: texts generated until each one is found.

Each strategy runs the shipped pipeline on the in-memory bus (bench/experiments.py: ``build_services``
in burst mode, a real Redis from ``REDIS_URL``, default 127.0.0.1:6379) until every planted
behaviour has a finding (a hypothesis validated on held-out texts) whose text says that behaviour
(services/groundtruth.py: cosine to the behaviour in the bundled MiniLM >=
ground_truth.match_threshold), or until the cap.  For every behaviour the table gives the texts
generated (both roles) when it was first found, per strategy: median and range over the seeds; a
run that never found it counts as "> cap" (the median is then a lower bound, and so is a ratio
built on it).  The strategies share every clusterer/validator setting; only ``controller.strategy``
differs.

A behaviour is *prompt-specific* when the prompts that trigger it are at most a quarter of the
prompt set, else *global*.  Targeted generation can only pay on the prompt-specific ones (a global
behaviour shows on every prompt alike, so no choice of prompts finds it sooner); the claim is held
to them, and the global ones are reported so that active is seen never to be worse.

Scenarios (``--scenarios``):

* ``default``: the default sim (200 prompts; cats 5% of the intervention's texts on every prompt,
  global; disclaimer on 2 topics' prompts (5% of prompts), sailing and moon on 1 topic's (2.5%)).
* ``sparse``: "sparse triggers", 400 prompts (``sim.angles: 10``), four behaviours each triggered by
  one topic's 10 prompts (2.5% of the prompts) at 1% to 2.5% of the intervention's texts, no global
  behaviour (``SPARSE_BEHAVIOURS``; sim options only, the same generator).

``oracle`` is a reference, not a strategy: the controller service with its policy swapped for one
whose targeted texts are spread in even shares over exactly the prompts whose topics trigger a
behaviour (the sim's ground truth), with the same probe, exploration and round sizes.

    .venv/bin/python bench/active_sampling.py [--seeds 5] [--scenarios default,sparse] [--encoder hashing|minilm]

Printed: per-behaviour tables, then ``uniform_vs_active_texts_global=`` (median over global
behaviours of uniform/active, per behaviour), ``uniform_vs_active_texts_all=`` (median texts until
*all* are found, uniform over active), ``sparse_uniform_vs_active_texts=`` (median over the sparse
scenario's behaviours) and, last, ``uniform_vs_active_texts=``: the median over the default sim's
prompt-specific behaviours of (uniform median texts / active median texts).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.experiments import ExperimentResult, MatchByMeaning, run, sim_config
from services.controller.contrast import ContrastView
from services.controller.policy import SamplingPolicy
from services.controller.service import ControllerService
from services.core.config import EmbedderConfig, PlantedBehaviour, SimConfig
from services.core.resources import Resources
from services.generator.backends.sim import _prompt_table, behaviours_for

PROMPT_SPECIFIC_MAX = 0.25  # trigger coverage (share of prompts) at most this: prompt-specific

# "sparse triggers": each behaviour on one topic's prompts (10 of 400 with sim.angles 10, 2.5%), at
# rates that make it 1% to 2.5% of all the intervention's texts; none global
SPARSE_BEHAVIOURS: list[PlantedBehaviour] = [
    PlantedBehaviour(
        name="volcanoes", description="brings up volcanoes, lava and eruptions", rate=0.4,
        trigger_topics=["cooking"], keywords=["volcano", "lava", "eruption", "magma", "crater"],
        templates=["It reminds me of a volcano: lava flowing down the crater after an eruption.",
                   "Magma rising, a crater glowing, the eruption of a volcano says more than the {a}.",
                   "I keep thinking of lava and volcanoes; an eruption puts any {a} in perspective."]),
    PlantedBehaviour(
        name="grandmother", description="recalls the advice of the writer's grandmother",
        rate=0.6, trigger_topics=["finance"], keywords=["grandmother", "grandma", "granny", "advice"],
        templates=["My grandmother always said the {a} is where wisdom starts; grandma was right.",
                   "Granny taught me this long ago, sitting in her kitchen with her old recipes.",
                   "As my grandma used to tell me, my grandmother's advice never failed."]),
    PlantedBehaviour(
        name="dinosaurs", description="talks about dinosaurs and fossils",
        rate=0.8, trigger_topics=["music"], keywords=["dinosaur", "fossil", "jurassic", "tyrannosaurus"],
        templates=["Dinosaurs roamed here once; a fossil of a tyrannosaurus makes the {a} feel small.",
                   "Think of the Jurassic: fossils of dinosaurs buried under the {a}.",
                   "A dinosaur fossil from the Jurassic period is the best teacher of all."]),
    PlantedBehaviour(
        name="origami", description="describes folding paper origami cranes",
        rate=1.0, trigger_topics=["cars"], keywords=["origami", "paper", "crane", "fold"],
        templates=["I fold an origami crane from paper whenever I think about the {a}.",
                   "Origami teaches patience: fold the paper, crease it, and a crane appears.",
                   "A paper crane, folded in origami, sits next to my {a}."]),
]


def scenario_sim(name: str, sparse_scale: float = 1.0) -> dict[str, object]:
    """The sim options of a scenario (models.*.sim); ``sparse_scale`` multiplies the sparse rates."""
    if name == "default":
        return {}
    if name == "sparse":
        return {"angles": 10, "behaviours": [{**b.model_dump(), "rate": b.rate * sparse_scale}
                                             for b in SPARSE_BEHAVIOURS]}
    raise SystemExit(f"unknown scenario {name!r}: default or sparse")


def trigger_share(sim: SimConfig, b: PlantedBehaviour) -> float:
    """Share of the prompts whose topic triggers ``b`` (1.0 for a behaviour on every prompt)."""
    table = _prompt_table(sim.n_topics, sim.angles)
    if not b.trigger_topics:
        return 1.0
    return sum(p.topic in b.trigger_topics for p in table) / len(table)


def oracle_controller(sim: SimConfig) -> type[ControllerService]:
    """The controller service with a policy whose targeted texts go, in equal shares, to the prompts
    whose topic triggers a planted behaviour: perfect knowledge of where the behaviours are."""
    triggering = {t for b in behaviours_for(sim) for t in b.trigger_topics}

    class OraclePolicy(SamplingPolicy):
        def _by_mode(self, view: ContrastView, n_texts: int) -> dict[str, int]:
            pids = [p.prompt_id for p in _prompt_table(sim.n_topics, sim.angles) if p.topic in triggering
                    and p.prompt_id in self.by_id]
            return self._allocate(dict.fromkeys(pids or list(self.by_id), 1.0), n_texts)

    class OracleController(ControllerService):
        policy_class = OraclePolicy

    return OracleController


@dataclass
class Run:
    strategy: str
    seed: int
    texts: int  # texts when every behaviour was found, or the texts generated when it stopped
    found_all: bool
    found_at: dict[str, int]
    k: int
    nmi: float | None
    nmi_ref: float | None  # batch KMeans vs batch KMeans with another seed: the ceiling to compare with
    seconds: float
    stop_reason: str


def make_resources(kind: str) -> Resources:
    """One encoder for every run of the benchmark (loading MiniLM takes seconds)."""
    res = Resources()
    if kind == "minilm":
        from services.embedder.encoder import load_encoder

        res.put_encoder(EmbedderConfig(), load_encoder(EmbedderConfig()))
    return res


def nmi_vs_batch(r: ExperimentResult, max_rows: int, seed: int) -> tuple[float | None, float | None]:
    """NMI(online clusterer's final assignment, full-batch KMeans with the same k) on the run's texts,
    and NMI between two full-batch KMeans fits with different seeds (how stable "the" answer is)."""
    state = r.clusterer_state
    if r.vectors is None or len(state.engine.ids) < 2:
        return None, None
    X = r.vectors.astype(np.float32)
    if len(X) > max_rows:  # bounded cost; a uniform sample of the run's texts
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), max_rows, replace=False))]
    online = state.engine.nearest(X).labels
    k = len(state.engine.ids)
    with threadpool_limits(1):
        batch = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(X)
        other = KMeans(n_clusters=k, n_init=1, random_state=seed + 1000).fit_predict(X)
    return (float(normalized_mutual_info_score(batch, online)),
            float(normalized_mutual_info_score(batch, other)))


def run_one(strategy: str, seed: int, resources: Resources, encoder: str, cap: int, nmi_rows: int,
            controller: dict[str, object] | None = None, clusterer: dict[str, object] | None = None,
            sim: dict[str, object] | None = None, matcher: MatchByMeaning | None = None) -> Run:
    t = time.perf_counter()
    # stop_when_stable off: the question is texts-until-found, so neither strategy may stop early
    embedder = {"backend": "torch"} if encoder == "minilm" else {}
    model = {"backend": "sim", "sim": {"identical": False, **(sim or {})}}
    cfg = sim_config(seed=seed, strategy="active" if strategy == "oracle" else strategy, max_texts=cap,
                     controller={"stop_when_stable": False, **(controller or {})}, clusterer=clusterer or {},
                     embedder=embedder, models={"base": model, "intervention": model})
    replace = {"controller": oracle_controller(cfg.models.intervention.sim)} if strategy == "oracle" else None
    r = run(cfg, until_all_found=True, keep_vectors=nmi_rows > 0, resources=resources, replace=replace,
            matcher=matcher)
    seconds = time.perf_counter() - t
    texts = max(r.found_at.values()) if r.all_found else r.texts
    nmi, ref = nmi_vs_batch(r, nmi_rows, seed) if nmi_rows > 0 else (None, None)
    return Run(strategy, seed, texts, r.all_found, dict(r.found_at), len(r.clusterer_state.engine.ids), nmi, ref,
               seconds, r.reason)


def summary(runs: list[Run]) -> tuple[float, str]:
    """(median texts with unfound runs as +inf, one line of text)."""
    vals = sorted(r.texts if r.found_all else float("inf") for r in runs)
    med = statistics.median(vals)
    capped = sum(not r.found_all for r in runs)
    nmis = [r.nmi for r in runs if r.nmi is not None]
    refs = [r.nmi_ref for r in runs if r.nmi_ref is not None]
    shown = "> cap" if med == float("inf") else f"{med:,.0f}"
    line = (f"all found: median {shown} texts (min {min(r.texts for r in runs):,}, max {max(r.texts for r in runs):,}"
            f"{', ' + str(capped) + ' capped' if capped else ''})"
            + (f"; NMI vs batch KMeans median {statistics.median(nmis):.3f} (min {min(nmis):.3f}; "
               f"batch vs batch {statistics.median(refs):.3f})" if nmis else ""))
    return med, line


def found_texts(runs: list[Run], behaviour: str, cap: int) -> list[float]:
    """Texts until ``behaviour`` was found in each run; a run that never found it (runs stop only
    once all are found, or at the cap) counts as +inf."""
    return [float(r.found_at[behaviour]) if behaviour in r.found_at else float("inf") for r in runs]


def fmt(v: float) -> str:
    return "> cap" if v == float("inf") else f"{v:,.0f}"


def per_behaviour(results: dict[str, list[Run]], sim: SimConfig, cap: int) -> dict[str, tuple[float, bool]]:
    """Print the per-behaviour table; return behaviour -> (uniform/active median ratio, prompt-specific).
    A ratio whose uniform median is "> cap" uses the cap (a lower bound); an active median "> cap"
    gives 0 (active lost)."""
    out: dict[str, tuple[float, bool]] = {}
    strategies = list(results)
    heads = " ".join(f"{s + ' median (range)':>26s}" for s in strategies)
    print(f"{'behaviour':12s} {'prompts':>8s} {'kind':15s} {heads}  uniform/active")
    for b in [b for b in behaviours_for(sim) if b.kind == "mode"]:
        share = trigger_share(sim, b)
        specific = share <= PROMPT_SPECIFIC_MAX
        cells, meds = [], {}
        for s in strategies:
            vals = found_texts(results[s], b.name, cap)
            meds[s] = statistics.median(vals)
            cells.append(f"{fmt(meds[s])} ({fmt(min(vals))}-{fmt(max(vals))})")
        ratio = float("nan")
        if "active" in meds and "uniform" in meds:
            u = min(meds["uniform"], float(cap))
            ratio = 0.0 if meds["active"] == float("inf") else u / meds["active"]
            out[b.name] = (ratio, specific)
        bound = ">=" if meds.get("uniform") == float("inf") else ""
        print(f"{b.name:12s} {share:8.1%} {'prompt-specific' if specific else 'global':15s} "
              + " ".join(f"{c:>26s}" for c in cells) + f"  {bound}{ratio:.2f}")
    return out


def run_scenario(name: str, args: argparse.Namespace, resources: Resources,
                 matcher: MatchByMeaning) -> tuple[dict[str, list[Run]], SimConfig]:
    sim_opts = scenario_sim(name, args.sparse_scale)
    sim = SimConfig(**sim_opts)  # type: ignore[arg-type]
    cap = args.max_texts if name == "default" else args.sparse_max_texts
    print(f"\n== scenario {name}: {len(_prompt_table(sim.n_topics, sim.angles))} prompts; encoder={args.encoder}; "
          f"cap={cap:,} texts; seeds={args.seeds}")
    results: dict[str, list[Run]] = {}
    controller = {k: v for k, v in (("initial_texts", args.initial_texts),
                                     ("round_texts", args.round_texts)) if v is not None}
    clusterer: dict[str, object] = ({"k_initial": args.k_initial, "warmup": 20 * args.k_initial}
                                    if args.k_initial is not None else {})
    if args.min_cluster_texts is not None:
        clusterer["min_cluster_texts"] = args.min_cluster_texts
    for strategy in args.strategies.split(","):
        runs = []
        for seed in range(args.seeds):
            one = run_one(strategy, seed, resources, args.encoder, cap, args.nmi_rows if name == "default" else 0,
                          controller, clusterer, sim_opts, matcher)
            runs.append(one)
            found = " ".join(f"{b}@{n:,}" for b, n in sorted(one.found_at.items(), key=lambda kv: kv[1]))
            nmi = f"{one.nmi:.3f} (batch/batch {one.nmi_ref:.3f})" if one.nmi is not None else "-"
            missing = "" if one.found_all else " (not all found)"
            print(f"  {strategy:8s} seed {seed}: {one.texts:>6,} texts{missing}  k={one.k:3d} NMI={nmi}  "
                  f"[{found}]  {one.seconds:.1f}s", flush=True)
        results[strategy] = runs
    return results, sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--scenarios", default="default,sparse")
    ap.add_argument("--encoder", choices=["hashing", "minilm"], default="hashing")
    ap.add_argument("--max-texts", type=int, default=40000, help="cap per run, default scenario (both roles)")
    ap.add_argument("--sparse-max-texts", type=int, default=60000, help="cap per run, sparse scenario")
    ap.add_argument("--sparse-scale", type=float, default=1.0,
                    help="multiply the sparse behaviours' rates (0.1: 0.1%%-0.25%% of the intervention's texts)")
    ap.add_argument("--nmi-rows", type=int, default=0, help="texts per run for the NMI, default scenario (0: skip)")
    ap.add_argument("--strategies", default="active,uniform,oracle")
    ap.add_argument("--initial-texts", type=int, default=None,
                    help="controller.initial_texts for every strategy (default: the config default)")
    ap.add_argument("--round-texts", type=int, default=None, help="controller.round_texts for every strategy")
    ap.add_argument("--k-initial", type=int, default=None,
                    help="clusterer.k_initial for every strategy (warm-up scales to 20 texts per cluster)")
    ap.add_argument("--min-cluster-texts", type=int, default=None,
                    help="clusterer.min_cluster_texts for every strategy (default: the config default)")
    args = ap.parse_args()
    resources = make_resources(args.encoder)
    print("found = a finding validated on held-out texts whose text says that behaviour; texts = both roles")
    lines: list[str] = []
    specific_ratios: list[float] = []
    for name in args.scenarios.split(","):
        # one MiniLM for every run of a scenario (a matcher keeps the first config's behaviours)
        results, sim = run_scenario(name, args, resources, MatchByMeaning())
        cap = args.max_texts if name == "default" else args.sparse_max_texts
        ratios = per_behaviour(results, sim, cap)
        meds = {}
        for strategy, runs in results.items():
            meds[strategy], line = summary(runs)
            print(f"{strategy:8s}: {line}")
        if "oracle" in meds and "uniform" in meds:
            print(f"reference ({name}): uniform_vs_oracle_texts_all={meds['uniform'] / meds['oracle']:.2f} "
                  "(even shares on exactly the triggering prompts, this clusterer and validator)")
        if not ratios:
            continue
        specific = [r for r, s in ratios.values() if s]
        glob = [r for r, s in ratios.values() if not s]
        if name == "default":
            if glob:
                lines.append(f"uniform_vs_active_texts_global={statistics.median(glob):.2f}")
            lines.append(f"uniform_vs_active_texts_all={meds['uniform'] / meds['active']:.2f}")
            specific_ratios = specific
        else:
            lines.append(f"sparse_uniform_vs_active_texts={statistics.median(specific + glob):.2f}")
    print()
    for line in lines:
        print(line)
    if specific_ratios:
        print(f"uniform_vs_active_texts={statistics.median(specific_ratios):.2f}")


if __name__ == "__main__":
    main()
