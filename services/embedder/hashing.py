"""A fast, dependency-light encoder: hashed word/bigram TF-IDF features, randomly projected.

Not a semantic model: it exists for statistics tests and benchmarks that need thousands of
embeddings per second on two CPU cores (the bundled MiniLM does ~230 texts/s), and as an option
for very cheap runs.  scikit-learn's HashingVectorizer does the hashing; a fixed Gaussian random
projection (Johnson-Lindenstrauss) maps to ``dim`` dimensions, so vectors are deterministic across
processes and need no fitting.
"""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer

from services.core.config import EmbedderConfig
from services.embedder.encoder import normalise_text

N_FEATURES = 1 << 14


class HashingEncoder:
    def __init__(self, cfg: EmbedderConfig, dim: int = 384, seed: int = 0) -> None:
        self.cfg = cfg
        self.dim = dim
        self.max_chars = cfg.max_chars
        self.model_key = f"hashing-v1:{N_FEATURES}:{dim}:{seed}:{cfg.normalize}"
        self._vec = HashingVectorizer(n_features=N_FEATURES, ngram_range=(1, 2), alternate_sign=False,
                                      norm="l2", stop_words="english")
        rng = np.random.default_rng(seed)
        self._proj = (rng.standard_normal((N_FEATURES, dim)) / np.sqrt(dim)).astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encode_normalised([normalise_text(t, self.max_chars) for t in texts])

    def encode_normalised(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), np.float32)
        X = self._vec.transform(texts)
        out = np.asarray(X @ self._proj, dtype=np.float32)
        if self.cfg.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
