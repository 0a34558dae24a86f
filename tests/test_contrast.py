"""Active sampling's per-text signal: neighbour lists, the pair-swap null, modes and coverage.

Synthetic paired streams (fixed seeds): each pair draws a topic; both models write near the topic's
centre, except that on topics 0 and 1 the intervention model sometimes writes near a behaviour
centre of that topic (A and B) that the base model never reaches.
"""

from __future__ import annotations

import numpy as np

from services.controller.contrast import ContrastIndex
from services.core.config import ContrastConfig

DIM, TOPICS = 32, 8


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def paired_stream(seed: int, pairs: int, rate: float) -> list[tuple[str, str, str, str, np.ndarray, str]]:
    """(text id, pair id, prompt id, role, vector, behaviour "A"/"B" or "") for ``pairs`` pairs."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(TOPICS + 2, DIM)))
    out = []
    for p in range(pairs):
        topic = int(rng.integers(TOPICS))
        prompt = f"t{topic}-{int(rng.integers(5))}"
        for role in ("base", "intervention"):
            planted = role == "intervention" and topic < 2 and rng.random() < rate
            centre = centres[TOPICS + topic] if planted else centres[topic]
            vec = unit((centre + 0.06 * rng.normal(size=DIM))[None])[0]
            out.append((f"{p}:{role}", f"pair{p}", prompt, role, vec, "AB"[topic] if planted else ""))
    return out


def index_of(stream: list, cfg: ContrastConfig | None = None, batches: int = 1) -> tuple[ContrastIndex, object]:
    ci = ContrastIndex(cfg or ContrastConfig(), seed=1)
    view = None
    for chunk in np.array_split(np.arange(len(stream)), batches):
        for i in chunk:
            tid, pair, prompt, role, vec, _ = stream[i]
            ci.add(tid, pair, prompt, role, vec)
        view = ci.refresh()
    return ci, view


def test_incremental_neighbour_lists_equal_exact_search() -> None:
    stream = paired_stream(0, 600, rate=0.4)
    ci, _ = index_of(stream, ContrastConfig(neighbours=16), batches=5)
    X = np.stack([s[4] for s in stream]).astype(np.float32)
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    exact = np.argsort(-sims, axis=1)[:, :16]
    assert (exact == ci.I).mean() > 0.999  # float ties aside, the same lists
    np.testing.assert_allclose(ci.D, np.take_along_axis(sims, exact, axis=1), atol=1e-5)


def test_one_sided_texts_are_hot_and_form_one_mode() -> None:
    stream = paired_stream(1, 1500, rate=0.4)
    _, view = index_of(stream, batches=3)
    behaviour = np.array([s[5] for s in stream])
    planted = behaviour != ""
    assert (behaviour == "A").sum() > 40 and (behaviour == "B").sum() > 40
    assert view.hot[planted].mean() > 0.9
    assert view.hot[~planted].mean() < 0.03  # the null quantile is 0.99
    for b in "AB":  # one mode per behaviour, holding (nearly) all of its texts
        modes = set(view.mode[(behaviour == b) & view.hot].tolist())
        assert len(modes) == 1
        assert view.mode_size[(behaviour == b) & view.hot][0] >= (behaviour == b).sum() * 0.9
    assert view.n_modes <= 2 + int(view.hot[~planted].sum())
    evidence = view.prompt_evidence(saturation=10_000)
    triggering = [h / n for p, (h, n) in evidence.items() if p[:3] in ("t0-", "t1-")]
    rest = [h / n for p, (h, n) in evidence.items() if p[:3] not in ("t0-", "t1-")]
    assert min(triggering) > 3 * max(rest)


def test_null_stream_has_few_hot_texts() -> None:
    for seed in (2, 3):
        _, view = index_of(paired_stream(seed, 1500, rate=0.0), batches=2)
        assert view.hot.mean() < 0.025, view.hot.mean()  # about 1 - hot_quantile


def test_saturated_and_covered_modes_need_nothing_more() -> None:
    stream = paired_stream(4, 1500, rate=0.4)
    ci, view = index_of(stream)
    behaviour = np.array([s[5] for s in stream])
    a, b = (behaviour == "A") & view.hot, (behaviour == "B") & view.hot
    assert view.need(saturation=10_000)[a | b].min() > 0.9
    assert view.need(saturation=10)[a | b].max() == 0.0  # both modes hold far more than 10 texts
    # a validated cluster mostly of A's texts (with a few of B's, as early coarse clusters have)
    # covers A only: B's prompts keep earning targeted samples
    ids = np.array([s[0] for s in stream])
    ci.explain(ids[a][:20].tolist() + ids[b][:4].tolist() + ids[~(a | b)][:30].tolist())
    view = ci.refresh()
    assert view.covered[a].all() and not view.covered[b].any()
    assert view.need(10_000)[a].max() == 0.0
    assert view.need(10_000)[b].min() > 0.9


def test_redelivered_texts_are_indexed_once() -> None:
    stream = paired_stream(5, 200, rate=0.4)
    ci, _ = index_of(stream)
    for tid, pair, prompt, role, vec, _ in stream[:50]:
        ci.add(tid, pair, prompt, role, vec)
    assert len(ci) == len(stream)
    assert len(ci.refresh().prompt_ids) == len(stream)
