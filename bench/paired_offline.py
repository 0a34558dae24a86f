"""The paired-contrast path offline (services/paired/discover.py) on the real sets and the sim.

For each real set in ../shared/data: the validated findings with direction and effect, the pair
identity accuracy of those findings on held-out pairs (and of every bank feature, for reference),
the embedding direction's held-out AUC with its pair-swap p-value, and the same run on pair-swap
nulls (3 seeds) whose validated counts should all be 0.  The sim runs with its styles planted;
its last line is the style recall.

    PYTHONPATH=. python bench/paired_offline.py [--data ../shared/data] [--vectors /tmp/paired-vectors]

Vectors are MiniLM (the bundled encoder); ``--vectors DIR`` caches them there between runs (never
in the repository), ``--no-vectors`` skips the direction.  Not the shipped pipeline: bench/ for that
is the coordinator's bench/discovery.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from services.core.config import Config, EmbedderConfig
from services.generator.backends.sim import DEFAULT_STYLES
from services.paired.discover import PairedRun, discover_paired
from services.paired.features import FeatureCache
from services.paired.pairs import Pair, pairs_from_replay, pairs_from_sim, swap_null, with_vectors
from services.paired.truth import styles_found

# name -> (file in the shared data directory, base model, intervention model)
REAL_SETS = {
    "hc3": ("hc3_human_vs_chatgpt.jsonl", "human", "chatgpt"),
    "helm": ("helm_summaries_cohere_vs_tnlg.jsonl", "cohere", "tnlg"),
}


def shared_data_dir() -> Path:
    """The nearest ``shared/data`` beside the repository or one of its parents (worktrees too)."""
    root = Path(__file__).resolve().parents[1]
    return next((p / "shared" / "data" for p in root.parents if (p / "shared" / "data").is_dir()),
                root.parent / "shared" / "data")


def vectors_for(name: str, pairs: list[Pair], cache_dir: Path | None) -> list[Pair]:
    from services.embedder.encoder import load_encoder

    path = cache_dir / f"{name}.npz" if cache_dir else None
    ids = np.array([p.pair_id for p in pairs])
    if path is not None and path.is_file():
        z = np.load(path)
        if np.array_equal(z["ids"], ids):
            return with_vectors(pairs, z["base"], z["intervention"])
    enc = load_encoder(EmbedderConfig())
    b, i = enc.encode([p.base for p in pairs]), enc.encode([p.intervention for p in pairs])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=ids, base=b, intervention=i)
    return with_vectors(pairs, b, i)


def show(name: str, run: PairedRun, seconds: float) -> None:
    d = run.direction
    direction = (f"direction AUC {d.auc:.3f} (pair-swap p {d.p_value:.3g}, pair accuracy {d.pair_accuracy:.3f})"
                 if d else "")
    bank = f"{run.feature_bank_accuracy:.3f}" if run.feature_bank_accuracy is not None else "-"
    print(f"\n== {name}: {run.n_pairs} pairs ({run.n_label} label / {run.n_held} held out), {run.n_proposed} proposed, "
          f"{len(run.findings)} tested, {len(run.validated)} validated, {seconds:.1f}s")
    print(f"   pair identity accuracy {run.identity_accuracy:.3f} (every bank feature: {bank}) {direction}")
    for f in run.validated:
        (lo, hi), r = f.ci_intervention_higher, f.result
        print(f"   + P(int>base)={f.p_intervention_higher:.2f} [{lo:.2f},{hi:.2f}] p={r.p_value:.1e} "
              f"{f.hypothesis.proposer}: {f.text}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_data_dir())
    ap.add_argument("--vectors", type=Path, default=None, help="directory caching MiniLM vectors")
    ap.add_argument("--no-vectors", action="store_true")
    ap.add_argument("--null-seeds", type=int, default=3)
    args = ap.parse_args()
    cfg = Config()
    rows = []
    for name, (file, base, intervention) in REAL_SETS.items():
        path = args.data / file
        if not path.is_file():
            print(f"skip {name}: {path} is absent")
            continue
        pairs = pairs_from_replay(path, base, intervention)
        if not args.no_vectors:
            pairs = vectors_for(name, pairs, args.vectors)
        cache = FeatureCache()
        t = time.time()
        run = discover_paired(pairs, cfg, cache=cache)
        show(f"{name} ({base} -> {intervention})", run, time.time() - t)
        nulls = [discover_paired(swap_null(pairs, s), cfg, cache=cache, feature_bank=False)
                 for s in range(args.null_seeds)]
        counts = [len(r.validated) for r in nulls]
        aucs = [f"{r.direction.auc:.3f}/p={r.direction.p_value:.2f}" for r in nulls if r.direction]
        print(f"   pair-swap nulls: validated {counts}; identity {[round(r.identity_accuracy, 3) for r in nulls]}; "
              f"direction {aucs}")
        rows.append((name, len(run.validated), run.identity_accuracy, counts))
    t = time.time()
    run = discover_paired(pairs_from_sim(0), cfg)
    show("sim (styles planted)", run, time.time() - t)
    found = styles_found([f.hypothesis for f in run.validated], DEFAULT_STYLES)
    nulls = [len(discover_paired(pairs_from_sim(s, identical=True), cfg, feature_bank=False).validated)
             for s in range(3)]
    print(f"   sim identical pair (3 seeds): validated {nulls}")
    print("\nset   validated  identity  null validated")
    for name, n, acc, counts in rows:
        print(f"{name:5s} {n:9d}  {acc:8.3f}  {counts}")
    print(f"style_recall={len(found)}/{len(DEFAULT_STYLES)}")


if __name__ == "__main__":
    main()
