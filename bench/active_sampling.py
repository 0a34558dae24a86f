"""Active vs uniform sampling: generated texts until every planted behaviour is found and validated.

On the simulated pair with its four planted behaviours (cats 5% of the intervention's texts on
every prompt; disclaimer 2%, sailing 1.5% and moon 1%, each on a few topics' prompts), each
strategy runs the shipped pipeline on the in-memory bus (bench/experiments.py: ``build_services``
in burst mode, a real Redis from ``REDIS_URL``, default 127.0.0.1:6379) until every behaviour has
a finding (a hypothesis validated on held-out texts) whose text says that behaviour
(services/groundtruth.py: cosine to the behaviour in the bundled MiniLM >=
ground_truth.match_threshold), or until the cap.  The strategies share every clusterer/validator
setting; only ``controller.strategy`` differs.  A run that hits the cap counts as "> cap" (the
median is then a lower bound).

``oracle`` is a reference, not a strategy: the controller service with its policy swapped for one
whose targeted texts are spread in even shares over exactly the prompts whose topics trigger a
behaviour (the sim's ground truth), with the same probe, exploration and round sizes.
uniform/oracle is what perfect knowledge of *where* the behaviours are buys with this clusterer
and validator; an active policy that beats it does so by favouring the prompts that show a
behaviour most often.

Clustering quality: NMI between the online clusterer's assignment of the run's texts (nearest of
its final centroids) and full-batch sklearn KMeans with the same k on the same texts.

    .venv/bin/python bench/active_sampling.py [--seeds 10] [--encoder hashing|minilm] [--max-texts 60000]

The last line is ``uniform_vs_active_texts=<median uniform / median active>``.
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

from bench.experiments import ExperimentResult, run, sim_config
from services.controller.contrast import ContrastView
from services.controller.policy import SamplingPolicy
from services.controller.service import ControllerService
from services.core.config import EmbedderConfig, SimConfig
from services.core.resources import Resources
from services.generator.backends.sim import _prompt_table, behaviours_for


def oracle_controller(sim: SimConfig) -> type[ControllerService]:
    """The controller service with a policy whose targeted texts go, in equal shares, to the prompts
    whose topic triggers a planted behaviour: perfect knowledge of where the behaviours are."""
    triggering = {t for b in behaviours_for(sim) for t in b.trigger_topics}

    class OraclePolicy(SamplingPolicy):
        def _by_mode(self, view: ContrastView, n_texts: int) -> dict[str, int]:
            pids = [p.prompt_id for p in _prompt_table(sim.n_topics) if p.topic in triggering
                    and p.prompt_id in self.by_id]
            return self._allocate(dict.fromkeys(pids, 1.0), n_texts)

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
            controller: dict[str, object] | None = None, clusterer: dict[str, object] | None = None) -> Run:
    t = time.perf_counter()
    # stop_when_stable off: the question is texts-until-found, so neither strategy may stop early
    embedder = {"backend": "torch"} if encoder == "minilm" else {}
    cfg = sim_config(seed=seed, strategy="active" if strategy == "oracle" else strategy, max_texts=cap,
                     controller={"stop_when_stable": False, **(controller or {})}, clusterer=clusterer or {},
                     embedder=embedder)
    replace = {"controller": oracle_controller(cfg.models.intervention.sim)} if strategy == "oracle" else None
    r = run(cfg, until_all_found=True, keep_vectors=nmi_rows > 0, resources=resources, replace=replace)
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
    line = (f"median {shown} texts (min {min(r.texts for r in runs):,}, max {max(r.texts for r in runs):,}"
            f"{', ' + str(capped) + ' capped' if capped else ''}); "
            + (f"NMI vs batch KMeans median {statistics.median(nmis):.3f} (min {min(nmis):.3f}; "
               f"batch vs batch {statistics.median(refs):.3f})" if nmis else ""))
    return med, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--encoder", choices=["hashing", "minilm"], default="hashing")
    ap.add_argument("--max-texts", type=int, default=60000, help="cap per run (both roles together)")
    ap.add_argument("--nmi-rows", type=int, default=12000, help="texts per run for the NMI (0: skip)")
    ap.add_argument("--strategies", default="active,uniform,oracle")
    ap.add_argument("--initial-texts", type=int, default=None,
                    help="controller.initial_texts for every strategy (default: the config default)")
    ap.add_argument("--round-texts", type=int, default=None, help="controller.round_texts for every strategy")
    ap.add_argument("--k-initial", type=int, default=None,
                    help="clusterer.k_initial for every strategy (warm-up scales to 20 texts per cluster)")
    args = ap.parse_args()
    resources = make_resources(args.encoder)
    print(f"sim pair, planted behaviours; encoder={args.encoder}; cap={args.max_texts:,} texts; "
          f"seeds={args.seeds}; found = a finding validated on held-out texts whose text says that behaviour")
    results: dict[str, list[Run]] = {}
    for strategy in args.strategies.split(","):
        runs = []
        for seed in range(args.seeds):
            controller = {k: v for k, v in (("initial_texts", args.initial_texts),
                                             ("round_texts", args.round_texts)) if v is not None}
            clusterer = ({"k_initial": args.k_initial, "warmup": 20 * args.k_initial}
                         if args.k_initial is not None else {})
            one = run_one(strategy, seed, resources, args.encoder, args.max_texts, args.nmi_rows, controller,
                          clusterer)
            runs.append(one)
            found = " ".join(f"{b}@{n:,}" for b, n in sorted(one.found_at.items(), key=lambda kv: kv[1]))
            nmi = f"{one.nmi:.3f} (batch/batch {one.nmi_ref:.3f})" if one.nmi is not None else "-"
            missing = "" if one.found_all else " (not all found)"
            print(f"  {strategy:8s} seed {seed}: {one.texts:>6,} texts{missing}  k={one.k:3d} NMI={nmi}  "
                  f"[{found}]  {one.seconds:.1f}s", flush=True)
        results[strategy] = runs
    meds = {}
    for strategy, runs in results.items():
        meds[strategy], line = summary(runs)
        print(f"{strategy:8s}: {line}")
    if "oracle" in meds and "uniform" in meds:
        print(f"reference: uniform_vs_oracle_texts={meds['uniform'] / meds['oracle']:.2f} "
              "(even shares on exactly the triggering prompts, this clusterer and validator)")
    if "active" in meds and "uniform" in meds:
        ratio = meds["uniform"] / meds["active"]
        print(f"uniform_vs_active_texts={ratio:.2f}")


if __name__ == "__main__":
    main()
