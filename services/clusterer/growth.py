"""Where the clusterer grows: which clusters to split, and how a split parent's counts are shared.

Growth from ``k_initial`` toward ``k_max`` runs every ``split_every`` texts and splits, in order:

1. reported clusters that kept growing (:func:`regrown`): a cluster is tested until it is reported,
   never after, and early clusters are coarse, so one reported for a common behaviour can go on to
   collect a rare one's texts, which would then stay unreported;
2. clusters whose two roles' mean vectors sit apart (:func:`role_divergence`): a behaviour mixed
   into the ordinary texts of the same prompts keeps a cluster at a 50/50 share (generation is
   paired), so its share test cannot fire until the behaviour has its own cluster;
3. the largest by estimated SSE, while more than ``parting_reserve`` of ``k_max`` is left (the
   rest is kept for 1 and 2).

Choosing splits with role labels does not bias the share tests, which count only texts assigned
to the children after the split (``own`` counts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from services.core.config import ClustererConfig

MIN_SPLIT_MEMBERS = 8  # member vectors a 2-means split needs to mean anything

Members = Callable[[int], tuple[np.ndarray, np.ndarray]]  # cluster id -> (vectors, role codes)


def role_divergence(X: np.ndarray, roles: np.ndarray, min_per_role: int = 4) -> tuple[float, float]:
    """(unbiased squared distance between the two roles' mean vectors, its noise term
    tr(S_0)/n_0 + tr(S_1)/n_1); (0, inf) when a role has too few samples."""
    parts = [X[roles == r] for r in (0, 1)]
    if min(len(p) for p in parts) < min_per_role:
        return 0.0, float("inf")
    means = [p.mean(axis=0) for p in parts]
    noise = sum(float(((p - m) ** 2).sum()) / (len(p) - 1) / len(p) for p, m in zip(parts, means, strict=True))
    return float(((means[0] - means[1]) ** 2).sum()) - noise, noise


def regrown(cfg: ClustererConfig, emitted_at: dict[int, int], own_total: Callable[[int], int],
            n_members: Callable[[int], int]) -> list[tuple[float, int]]:
    """(growth, id) of reported clusters whose own texts reached ``resplit_growth`` times their
    size when reported (and ``resplit_min_size``); ``n_members`` is 0 for a retired id."""
    out = []
    for cid, at in emitted_at.items():
        m = n_members(cid)
        if m == 0:
            continue
        own = own_total(cid)
        if own >= cfg.resplit_growth * max(at, 1) and own >= cfg.resplit_min_size and m >= MIN_SPLIT_MEMBERS:
            out.append((own / max(at, 1), cid))
    return out


def choose_splits(cfg: ClustererConfig, active: Iterable[tuple[int, int, np.ndarray]], members: Members,
                  regrowing: list[tuple[float, int]]) -> list[tuple[int, bool]]:
    """(id, chosen because the two models part there) to split now, at most
    ``max_splits_per_check`` and the room left under ``k_max``.

    ``active``: (id, displayed texts, centroid) of every active cluster, in the engine's order."""
    active = list(active)
    room = cfg.k_max - len(active)
    if room <= 0:
        return []
    sse, mixed = [], []
    reserved = len(active) >= cfg.k_max - round(cfg.parting_reserve * cfg.k_max)
    for cid, total, centroid in active:
        Xr, roles = members(cid)
        if total < min(cfg.split_min_size, cfg.mixed_split_min_size) or len(Xr) < MIN_SPLIT_MEMBERS:
            continue
        div, noise = role_divergence(Xr, roles)
        # a small cluster is split only when its two sides clearly sit apart (divergence above its
        # own noise term); a large one whenever they do, or by size
        # within the reserve (the last parting_reserve of k_max), only where they clearly part: at
        # any positive divergence, noise alone used up the room a behaviour needs to be carved out
        if div > 0 and ((total >= cfg.split_min_size and not reserved) or div >= noise):
            mixed.append((div, cid))
        if total >= cfg.split_min_size:
            disp = float(np.mean(np.sum((Xr - centroid) ** 2, axis=1)))
            sse.append((total * disp, cid))
    budget = min(room, cfg.max_splits_per_check)
    chosen = [cid for _, cid in sorted(regrowing, reverse=True)[:budget]]
    chosen += [cid for _, cid in sorted(mixed, reverse=True) if cid not in chosen][: max(1, budget // 2)]
    parting = set(chosen)
    # splits by size alone stop short of k_max: the last ``parting_reserve`` of it is kept for the
    # splits above, which carve a behaviour out of the cluster that hides it.  Without the reserve,
    # size splits filled k_max early on a wide prompt set, and a 1% behaviour that still shared a
    # cluster with its prompts' ordinary texts stayed there for good (uniform, seed 2: moon not found
    # in 40,000 texts; sparse triggers: one behaviour not found in 60,000)
    sse_room = max(0, cfg.k_max - round(cfg.parting_reserve * cfg.k_max) - len(active) - len(chosen))
    chosen += [cid for _, cid in sorted(sse, reverse=True) if cid not in chosen][: min(budget - len(chosen), sse_room)]
    return [(cid, cid in parting) for cid in chosen[:budget]]


def inherited_counts(parent_total: np.ndarray, to_a: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """(2 children, 2 roles) counts the children inherit from the parent's displayed counts.

    For each role r with N_r parent texts and m_r member vectors of role r, of which m_ra are
    nearer child a: a inherits round(N_r * m_ra / m_r) and b the rest (the overall member fraction
    when m_r = 0), so totals are conserved exactly.  These are estimates from a sample, never
    tested: the share tests count only texts assigned after the split."""
    out = np.zeros((2, 2), np.int64)
    for r in (0, 1):
        mine = roles == r
        frac = float(to_a[mine].mean()) if mine.any() else float(to_a.mean())
        n = int(parent_total[r])
        out[0, r] = round(n * frac)
        out[1, r] = n - out[0, r]
    return out
