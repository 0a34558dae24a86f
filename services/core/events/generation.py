"""Generation: what the controller asks for, the texts the generators write, and their reports."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from services.core.events.base import Event, Role, new_id


class PromptRef(BaseModel):
    prompt_id: str
    text: str = ""  # empty string means decode from BOS


class Exemplar(BaseModel):
    """A text that a targeted request wants continued or re-sampled around."""

    text_id: str
    prompt_id: str
    text: str = ""
    prefix_tokens: int = 8  # continue from the exemplar's first N tokens/words


class Decoding(BaseModel):
    """Per-request decoding overrides; ``None`` means "the generator's configured default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    seed: int | None = None


class GenerationRequest(Event):
    topic: ClassVar[str] = "generation-requests"
    type: ClassVar[str] = "autointerv.generation.requested"
    key_doc: ClassVar[str] = "request id: spreads requests over generator replicas"

    request_id: str = Field(default_factory=new_id)
    pair_id: str = ""  # shared by the base and intervention requests planned together
    role: Role
    reason: Literal["seed", "uncertainty", "divergence_probe", "replay", "manual"] = "seed"
    round: int = 0
    prompts: list[PromptRef] = Field(default_factory=list)
    exemplars: list[Exemplar] = Field(default_factory=list)
    n_per_prompt: int = Field(default=1, ge=1)
    decoding: Decoding = Field(default_factory=Decoding)
    note: str = ""  # why this request exists, in words (logged by the controller)

    def event_id(self) -> str:
        return self.request_id

    def partition_key(self) -> str:
        return self.request_id  # spread across generator replicas


class DecodedText(Event):
    topic: ClassVar[str] = "texts"
    type: ClassVar[str] = "autointerv.text.decoded"
    key_doc: ClassVar[str] = "text id: spreads texts over embedder replicas"

    text_id: str
    request_id: str
    pair_id: str = ""  # same for the two roles' texts of one (paired request, prompt, sample)
    role: Role
    model_id: str
    prompt_id: str
    prompt: str = ""
    text: str
    sample_index: int = 0
    n_tokens: int = 0
    reason: str = "seed"
    round: int = 0
    backend: str = ""
    generated_at: float = Field(default_factory=time.time)
    meta: dict[str, Any] = Field(default_factory=dict)  # e.g. sim ground truth, logprobs

    def event_id(self) -> str:
        return self.text_id

    def partition_key(self) -> str:
        return self.text_id  # spread across embedder replicas


class GenerationFailure(BaseModel):
    prompt_id: str
    reason: str
    exhausted: bool = False  # replay data ran out for this prompt (not an error of the model)


class GenerationReport(Event):
    """What one generation request produced: the controller's round gate counts texts by these
    reports, not by what it planned, so failed or exhausted prompts never leave it waiting."""

    topic: ClassVar[str] = "generation-reports"
    type: ClassVar[str] = "autointerv.generation.reported"

    request_id: str
    pair_id: str = ""
    role: Role
    round: int = 0
    texts: int  # texts emitted for this request
    failures: list[GenerationFailure] = Field(default_factory=list)
    backend: str = ""
    seconds: float = 0.0
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.request_id
