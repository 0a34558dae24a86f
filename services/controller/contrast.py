"""Which texts sit where only one of the two models writes: the per-text signal active sampling targets.

Per-prompt divergence of mean embeddings needs ~10 samples per prompt and side before a prompt
whose intervention texts show a behaviour 40% of the time stands out from noise (a 200-prompt probe
of that size is ~4,000 texts: most of what uniform sampling needs to find everything).  A single
text can do better: a text that shows a behaviour the other model never shows sits among texts of
its own model only.  So for every text

    contrast = mean similarity to its ``local`` nearest texts of the same model
             - mean similarity to its ``local`` nearest texts of the other model

and a text is *hot* when its contrast exceeds the ``hot_quantile`` of the same statistic with the
two roles of each generation pair swapped at random: generation is paired, so under "no
difference" the two texts of a pair are exchangeable and the swap gives the exact null, whatever
the embedding.  Hot texts that are each other's near neighbours form *modes* (one per behaviour,
roughly); a mode with ``saturation_texts`` hot texts has enough for the clusterer and validator,
so the policy stops rewarding the prompts that produce it and spends on rarer ones.

Neighbour lists are kept incrementally (faiss inner-product search of each new batch against all
texts, and of all texts against the new batch), so a round costs O(N x batch) rather than O(N^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from services.core.config import ContrastConfig


@dataclass
class ContrastView:
    """One refresh's result, aligned with the index's rows."""

    prompt_ids: list[str]
    roles: np.ndarray  # bool: True for intervention
    contrast: np.ndarray
    threshold: float
    hot: np.ndarray  # bool
    mode: np.ndarray  # per text, its mode's label (-1 for texts that are not hot)
    mode_size: np.ndarray  # hot texts in the text's mode (0 for texts that are not hot)
    covered: np.ndarray  # bool: hot texts whose mode a validated hypothesis's cluster is mostly about

    @property
    def n_modes(self) -> int:
        return int(np.unique(self.mode[self.hot]).size)

    def need(self, saturation: int) -> np.ndarray:
        """Per text, what one more text like it is still worth: 1 for a hot text in a new mode,
        falling linearly to 0 as the mode reaches ``saturation`` hot texts, and 0 once a validated
        hypothesis covers the mode (or for texts that are not hot)."""
        need = np.where(self.hot, np.clip(1.0 - self.mode_size / saturation, 0.0, 1.0), 0.0)
        need[self.covered] = 0.0
        return need

    def open_mask(self, saturation: int, min_size: int = 1) -> np.ndarray:
        """Hot texts in modes of at least ``min_size`` that still need texts (not saturated, not covered)."""
        return self.hot & (self.need(saturation) > 0) & (self.mode_size >= min_size)

    def open_modes(self, saturation: int, min_size: int = 1) -> int:
        return len(set(self.mode[self.open_mask(saturation, min_size)].tolist()))

    def prompt_evidence(self, saturation: int) -> dict[str, tuple[float, int]]:
        """prompt id -> (summed need of its texts, generation pairs seen)."""
        need = self.need(saturation)
        hits: dict[str, float] = {}
        texts: dict[str, int] = {}
        for pid, v in zip(self.prompt_ids, need, strict=True):
            hits[pid] = hits.get(pid, 0.0) + float(v)
            texts[pid] = texts.get(pid, 0) + 1
        return {p: (hits[p], max(1, texts[p] // 2)) for p in texts}


class ContrastIndex:
    """Texts' embeddings with their nearest-neighbour lists, grown one batch at a time.

    200 generation pairs over 20 prompts; in one pair in ten the intervention writes somewhere the
    base model never does (prompts p0 and p10).  Those 20 texts are hot, in one mode of their own,
    and their prompts carry the most evidence for the next round:

    >>> import numpy as np
    >>> from services.core.config import ContrastConfig
    >>> rng = np.random.default_rng(0)
    >>> index = ContrastIndex(ContrastConfig(), dim=16, seed=0)
    >>> for i in range(200):
    ...     base, other = rng.normal(size=16), rng.normal(size=16)
    ...     if i % 10 == 0:
    ...         other[0] += 8.0
    ...     index.add(f"b{i}", f"pair{i}", f"p{i % 20}", "base", base)
    ...     index.add(f"i{i}", f"pair{i}", f"p{i % 20}", "intervention", other)
    >>> view = index.refresh()
    >>> biggest = view.mode == view.mode[np.argmax(view.mode_size)]
    >>> prompts = sorted({index.prompt_ids[r] for r in np.flatnonzero(biggest)})
    >>> prompts, int(biggest.sum()), bool(view.roles[biggest].all())  # all intervention texts
    (['p0', 'p10'], 20, True)
    >>> evidence = view.prompt_evidence(saturation=150)
    >>> sorted(evidence, key=lambda p: -evidence[p][0])[:2]
    ['p0', 'p10']
    >>> index.add("b0", "pair0", "p0", "base", rng.normal(size=16)); len(index)  # a redelivered text: ignored
    400
    """

    def __init__(self, cfg: ContrastConfig, dim: int | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.ids: set[str] = set()
        self.row_of: dict[str, int] = {}
        self.explained: list[list[str]] = []  # text ids of validated hypotheses' clusters
        self.prompt_ids: list[str] = []
        self.pair_ids: list[str] = []
        self.roles = np.zeros(0, dtype=bool)
        self.X = np.zeros((0, dim or 0), dtype=np.float32)
        self.D = np.zeros((0, cfg.neighbours), dtype=np.float32)  # similarities, descending
        self.I = np.zeros((0, cfg.neighbours), dtype=np.int64)  # row indices, -1 = empty
        self._pending: list[tuple[str, str, str, bool, np.ndarray]] = []
        self._index: faiss.IndexFlatIP | None = None
        self._view: ContrastView | None = None  # the last refresh's result, until a text or an explanation arrives

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self._pending)

    def add(self, text_id: str, pair_id: str, prompt_id: str, role: str, vec: np.ndarray) -> None:
        """Queue one text (duplicates by id are ignored: delivery is at-least-once)."""
        if text_id in self.ids or len(self) >= self.cfg.max_texts:
            return
        self.ids.add(text_id)
        self._view = None
        v = np.asarray(vec, dtype=np.float32).ravel()
        n = float(np.linalg.norm(v))
        self._pending.append((prompt_id, pair_id or text_id, text_id, role == "intervention", v / n if n else v))

    def refresh(self) -> ContrastView:
        """Integrate the queued texts, then score every text and find the hot ones (cached until
        the next text or explanation: a round asks more than once)."""
        if self._view is not None:
            return self._view
        if self._pending:
            self._integrate()
        contrast = self._contrast(self.roles)
        threshold = self._null_threshold()
        hot = contrast > threshold
        mode, size = self._modes(hot)
        self._view = ContrastView(list(self.prompt_ids), self.roles.copy(), contrast, threshold, hot, mode, size,
                                  self._covered(hot, mode))
        return self._view

    def explain(self, text_ids: list[str]) -> None:
        """Record the texts of a cluster whose hypothesis was validated (see :meth:`_covered`)."""
        self.explained.append(list(text_ids))
        self._view = None

    def _covered(self, hot: np.ndarray, mode: np.ndarray) -> np.ndarray:
        """Hot texts in a mode that makes up at least ``covered_share`` of the hot texts of some
        validated hypothesis's cluster.  Not every mode with a text in such a cluster: early clusters
        are coarse, and a rare behaviour's first few texts sit inside a common one's cluster."""
        covered_modes: set[int] = set()
        for ids in self.explained:
            rows = np.array([self.row_of[t] for t in ids if t in self.row_of], dtype=np.int64)
            if not len(rows):
                continue
            labels = mode[rows[hot[rows]]]
            if not len(labels):
                continue
            values, counts = np.unique(labels, return_counts=True)
            covered_modes.update(int(v) for v, c in zip(values, counts, strict=True)
                                 if c >= self.cfg.covered_share * len(labels))
        return hot & np.isin(mode, list(covered_modes))

    # ------------------------------------------------------------------ neighbour lists

    def _integrate(self) -> None:
        new = np.stack([p[4] for p in self._pending])
        if self._index is None:
            self.dim = new.shape[1]
            self._index = faiss.IndexFlatIP(self.dim)
            self.X = np.zeros((0, self.dim), dtype=np.float32)
        n0, K = len(self.prompt_ids), self.cfg.neighbours
        for prompt_id, pair_id, text_id, *_ in self._pending:
            self.row_of[text_id] = len(self.prompt_ids)
            self.prompt_ids.append(prompt_id)
            self.pair_ids.append(pair_id)
        self.roles = np.concatenate([self.roles, [p[3] for p in self._pending]])
        self._pending = []
        self.X = np.concatenate([self.X, new])
        self._index.add(new)
        n1 = len(self.prompt_ids)
        # the new texts against everything (themselves included; self-matches are dropped below)
        Dn, In = self._index.search(new, min(K + 1, n1))
        Dn, In = self._drop_self(Dn, In, np.arange(n0, n1))
        # the old texts against the new ones, merged into their lists
        if n0:
            batch = faiss.IndexFlatIP(self.dim)
            batch.add(new)
            Db, Ib = batch.search(self.X[:n0], min(K, n1 - n0))
            Dm = np.concatenate([self.D, Db], axis=1)
            Im = np.concatenate([self.I, Ib + n0], axis=1)
            Dm = np.where(Im >= 0, Dm, -np.inf)
            order = np.argsort(-Dm, axis=1, kind="stable")[:, :K]
            self.D = np.take_along_axis(Dm, order, axis=1).astype(np.float32)
            self.I = np.take_along_axis(Im, order, axis=1)
        self.D = np.concatenate([self.D, Dn])
        self.I = np.concatenate([self.I, In])

    def _drop_self(self, D: np.ndarray, I: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: E741
        """Remove each row's own index and pad to ``neighbours`` columns (-inf / -1)."""
        K = self.cfg.neighbours
        keep = rows[:, None] != I
        # rows whose own index was not returned (ties) lose their last column instead
        surplus = keep.sum(1) > K
        keep[surplus, -1] = False
        Do = np.full((len(rows), K), -np.inf, dtype=np.float32)
        Io = np.full((len(rows), K), -1, dtype=np.int64)
        for r in range(len(rows)):
            d, i = D[r][keep[r]], I[r][keep[r]]
            i = i[i >= 0]
            d = d[: len(i)]
            Do[r, : len(i)], Io[r, : len(i)] = d[:K], i[:K]
        return Do, Io

    # ------------------------------------------------------------------ scores

    def _contrast(self, roles: np.ndarray) -> np.ndarray:
        if not len(roles):
            return np.zeros(0, dtype=np.float32)
        valid = self.I >= 0
        neighbour_role = roles[np.where(valid, self.I, 0)]
        same = valid & (neighbour_role == roles[:, None])
        other = valid & ~same
        # a side with fewer than `local` texts in the list is filled with the list's last similarity:
        # an upper bound on that side's true similarity, so the contrast errs low (towards "not hot")
        floor = np.where(valid, self.D, np.inf).min(axis=1, keepdims=True)
        floor = np.where(np.isfinite(floor), floor, 0.0)
        return self._local_mean(same, floor) - self._local_mean(other, floor)

    def _local_mean(self, mask: np.ndarray, floor: np.ndarray) -> np.ndarray:
        k = self.cfg.local
        s = np.where(mask, self.D, -np.inf)
        top = -np.sort(-s, axis=1)[:, :k]  # lists are sorted already, but masks break the order
        top = np.where(np.isfinite(top), top, floor)
        return top.mean(axis=1)

    def _null_threshold(self) -> float:
        """The ``hot_quantile`` of the contrast with each pair's two roles swapped at random."""
        n = len(self.roles)
        if n < 4:
            return float("inf")
        first: dict[str, int] = {}
        a, b = [], []
        for i, pid in enumerate(self.pair_ids):
            j = first.setdefault(pid, i)
            if j != i and self.roles[j] != self.roles[i]:
                a.append(j)
                b.append(i)
        if not a:
            return float("inf")
        A, B = np.asarray(a), np.asarray(b)
        paired = np.zeros(n, dtype=bool)
        paired[A] = paired[B] = True
        null = []
        for _ in range(self.cfg.permutations):
            roles = self.roles.copy()
            swap = self.rng.random(len(A)) < 0.5
            roles[A[swap]], roles[B[swap]] = self.roles[B[swap]], self.roles[A[swap]]
            null.append(self._contrast(roles)[paired])
        return float(np.quantile(np.concatenate(null), self.cfg.hot_quantile))

    def _modes(self, hot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per text, its mode's label and size: the connected group of hot texts linked through
        their ``mode_neighbours`` nearest neighbours of the same role (-1 and 0 for texts that are
        not hot).  Fewer links split one behaviour into several modes (one per phrasing), which
        then look like separate, rarer differences."""
        size = np.zeros(len(hot), dtype=np.int64)
        mode = np.full(len(hot), -1, dtype=np.int64)
        if not hot.any():
            return mode, size
        k = self.cfg.mode_neighbours
        rows = np.repeat(np.arange(len(hot)), k)
        cols = self.I[:, :k].ravel()
        ok = (cols >= 0) & hot[rows] & hot[np.maximum(cols, 0)] & (self.roles[rows] == self.roles[np.maximum(cols, 0)])
        g = coo_matrix((np.ones(int(ok.sum())), (rows[ok], cols[ok])), shape=(len(hot), len(hot)))
        _, labels = connected_components(g, directed=True, connection="weak")
        counts = np.bincount(labels[hot], minlength=labels.max() + 1)
        size[hot] = counts[labels[hot]]
        mode[hot] = labels[hot]
        return mode, size
