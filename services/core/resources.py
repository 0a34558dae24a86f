"""Heavy objects shared by the services of one process.

``autointerv run`` puts every service in one process: the embedder and the embedding validator tier
each loaded their own copy of the same model (two MiniLMs, twice the memory and start-up time).
A :class:`Resources` instance lives in the :class:`~services.core.runtime.ServiceContext` and
hands out one encoder per distinct embedder config; benchmarks that run thousands of in-memory
experiments in one process reuse it across runs as well.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.core.config import EmbedderConfig
    from services.embedder.encoder import Encoder


async def make_encoder(cfg: EmbedderConfig) -> Encoder:
    """Load the configured encoder off the event loop (model loading takes seconds).

    The embedder modules are imported here, on first use, so that a process without an embedding
    model (the controller, the generator) never loads them."""
    if cfg.backend == "hashing":
        from services.embedder.hashing import HashingEncoder

        return HashingEncoder(cfg)
    from services.embedder.encoder import load_encoder

    return await asyncio.to_thread(load_encoder, cfg)


class Resources:
    def __init__(self) -> None:
        self._encoders: dict[str, Encoder] = {}
        self._lock = asyncio.Lock()

    async def encoder(self, cfg: EmbedderConfig) -> Encoder:
        """The process's encoder for this embedder config (loaded once, off the event loop)."""
        key = cfg.model_dump_json()
        async with self._lock:
            if key not in self._encoders:
                self._encoders[key] = await make_encoder(cfg)
            return self._encoders[key]

    def put_encoder(self, cfg: EmbedderConfig, encoder: Encoder) -> None:
        """Use an encoder built elsewhere for this config (benchmarks pass a shared one)."""
        self._encoders[cfg.model_dump_json()] = encoder
