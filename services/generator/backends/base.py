"""The one interface every generation backend speaks: a batch of tasks in, decoded texts out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from services.core.config import BackendConfig


@dataclass(frozen=True)
class DecodingParams:
    """Resolved decoding settings (config defaults merged with per-request overrides)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 48
    no_repeat_ngram_size: int = 0
    seed: int = 0


@dataclass(frozen=True)
class GenerationTask:
    """One prompt to decode ``n`` times.  ``prompt == ""`` means decode from BOS."""

    prompt_id: str
    prompt: str
    n: int
    decoding: DecodingParams
    seed: int  # per-task seed; sample i uses a seed derived from (seed, i)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"topic": ...} for sim prompts


@dataclass
class Generated:
    prompt_id: str
    sample_index: int
    text: str  # the continuation only, without the prompt
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


class GenerationError(RuntimeError):
    """A task that failed for good (after retries).  Counted and reported, never papered over.
    ``exhausted``: the data behind a replay backend ran out (expected at the end of a file, not a
    fault of the model)."""

    def __init__(self, message: str, prompt_id: str | None = None, *, exhausted: bool = False) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id
        self.exhausted = exhausted


class GenerationBackend(ABC):
    """Backends are bound to one model (one role).  ``generate`` must return exactly
    ``task.n`` results per task, in any order, or raise GenerationError for the failed tasks
    via the ``failures`` list of :class:`BatchResult`.

    A backend is built as ``cls(model_cfg, gen_cfg, role)``: ``model_cfg`` is an instance of the
    class's own ``config_model`` (its fields, validated at start-up), ``gen_cfg`` the shared
    decoding settings.  docs/extending.md shows a plug-in backend."""

    name: str = "base"
    config_model: ClassVar[type[BackendConfig]] = BackendConfig
    model_id: str = ""
    supports_logprobs: bool = False

    @abstractmethod
    async def generate(self, tasks: list[GenerationTask]) -> BatchResult: ...

    async def aclose(self) -> None:
        """Release model memory, HTTP pools, ..."""


@dataclass
class BatchResult:
    texts: list[Generated] = field(default_factory=list)
    failures: list[GenerationError] = field(default_factory=list)
