"""Offline contrastive labeler: log-odds of terms with an informative Dirichlet prior.

Monroe, Colaresi & Quinn (2008), "Fightin' Words": for each term, the log-odds ratio between the
target side and the contrast side, shrunk toward the pooled frequency, divided by its standard
error.  Terms with the highest z-scores are what most distinguishes the target side.  Written here
(about 30 lines of numpy) because no maintained library exposes this estimator; scikit-learn's
CountVectorizer does the tokenising and counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

TOKEN_PATTERN = r"(?u)\b[a-zA-Z][a-zA-Z'-]+\b"
KEYWORDS_PER_LABEL = 4
EXAMPLE_MARKER = " Typical: "  # describe() appends one label text after this: an illustration, not the claim


@dataclass(frozen=True)
class Term:
    term: str
    z: float
    target_count: int
    contrast_count: int


def log_odds_z(target: list[str], contrast: list[str], *, prior_scale: float = 0.5,
               ngram_range: tuple[int, int] = (1, 2),
               keep_stop_words: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(terms, z, target counts, contrast counts) for every term; z < 0 favours ``contrast``.

    Topic labels drop stop words; style contrasts keep them (``keep_stop_words``), because
    "however", "you" or "I" are often exactly what differs."""
    empty = np.zeros(0)
    if not target:
        return empty.astype(str), empty, empty, empty
    stop_words = None if keep_stop_words else list(ENGLISH_STOP_WORDS)
    vec = CountVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, stop_words=stop_words,
                          ngram_range=ngram_range, binary=True)  # binary: a term counts once per text
    try:
        counts = vec.fit_transform(target + contrast)
    except ValueError:  # only stop words
        return empty.astype(str), empty, empty, empty
    y_t = np.asarray(counts[: len(target)].sum(axis=0)).ravel().astype(float)
    y_c = np.asarray(counts[len(target):].sum(axis=0)).ravel().astype(float)
    pooled = y_t + y_c
    # the prior is the pooled frequency itself, scaled: with a few dozen texts per side a prior as
    # strong as the data (Monroe et al. use large background corpora) would shrink every z below 2
    alpha_w = prior_scale * pooled
    a0 = alpha_w.sum()
    n_t, n_c = y_t.sum(), y_c.sum()
    log_odds_t = np.log(y_t + alpha_w) - np.log(n_t + a0 - y_t - alpha_w)
    log_odds_c = np.log(y_c + alpha_w) - np.log(n_c + a0 - y_c - alpha_w)
    z = (log_odds_t - log_odds_c) / np.sqrt(1.0 / (y_t + alpha_w) + 1.0 / (y_c + alpha_w))
    return vec.get_feature_names_out(), z, y_t, y_c


def distinctive_terms(target: list[str], contrast: list[str], *, prior_scale: float = 0.5,
                      min_count: int = 2, ngram_range: tuple[int, int] = (1, 2),
                      keep_stop_words: bool = False) -> list[Term]:
    """Terms over-represented in ``target`` vs ``contrast``, best first (z > 0 only)."""
    names, z, y_t, y_c = log_odds_z(target, contrast, prior_scale=prior_scale, ngram_range=ngram_range,
                                    keep_stop_words=keep_stop_words)
    order = np.argsort(-z)
    return [Term(str(names[i]), float(z[i]), int(y_t[i]), int(y_c[i]))
            for i in order if z[i] > 0 and y_t[i] >= min_count]


def pick_keywords(terms: list[Term], k: int, exclude: set[str] = frozenset(), z_min: float = 1.64) -> list[str]:
    """Top-k terms above ``z_min``, skipping terms already used and words inside chosen bigrams."""
    chosen: list[str] = []
    covered: set[str] = set(exclude)
    for t in terms:
        if t.z < z_min or len(chosen) >= k:
            break
        words = set(t.term.split())
        if t.term in covered or words <= covered:
            continue
        chosen.append(t.term)
        covered |= words | {t.term}
    return chosen


def describe(direction: str, other: str, keywords: list[str], example: str | None) -> str:
    """A readable contrastive hypothesis from keywords."""
    if not keywords:
        return f"The {direction} model writes texts unlike the {other} model's in this cluster."
    listed = ", ".join(f"“{k}”" for k in keywords[:-1]) + (" and " if len(keywords) > 1 else "") + f"“{keywords[-1]}”"
    # the claim first and in few words: a frame longer than the keywords drowned them when the claim
    # is compared by meaning (ground truth matched 80 of 97 sim candidates' labels, 91 in this form)
    text = f"More often than the {other} model, the {direction} model mentions {listed}."
    if example:
        snippet = example if len(example) <= 140 else example[:137].rsplit(" ", 1)[0] + "…"
        text += f"{EXAMPLE_MARKER}“{snippet}”"
    return text


def claim_of(text: str) -> str:
    """The claim of a hypothesis: its text without the example text ``describe`` appends."""
    return text.split(EXAMPLE_MARKER, 1)[0]


def label_keywords(terms: list[Term], exclude: set[str] = frozenset(), k: int = KEYWORDS_PER_LABEL) -> list[str]:
    """The keywords of one label: significant terms, else the strongest ones.

    Few label texts cannot make any term significant; the labeler only proposes (validation on
    held-out texts decides), so it falls back to the strongest terms rather than none."""
    return pick_keywords(terms, k, exclude=exclude) or pick_keywords(terms, k, exclude=exclude, z_min=0.5)


def typical_example(target: list[str], keywords: list[str]) -> str | None:
    """The first target text containing (the first word of) a keyword."""
    return next((t for t in target if any(k.split()[0] in t.lower() for k in keywords)), None)


def offline_label(direction: str, other: str, target: list[str], contrast: list[str]) -> tuple[str, list[str]]:
    """(label text, keywords) of the offline labeler for ``target`` texts against ``contrast`` texts."""
    keywords = label_keywords(distinctive_terms(target, contrast))
    return describe(direction, other, keywords, typical_example(target, keywords)), keywords
