"""LLM proposer and judge for paired contrasts: prompts, strict parsers, deduplication.

The proposer sees K label pairs (prompt, the two answers) with the models named "Model 1" and
"Model 2" at random per call and the two answers of each example in random order (both recorded),
and names axes "this model's answer <axis> than the other's" with the model that is more so.  The
judge (services/paired/scorers.py) asks of one held-out pair which answer <axis>, in both orders.
Parsers raise ``ParseError`` rather than guess; the client re-asks once.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson

from services.core.config import PairedConfig
from services.llm.client import LLMClient, LLMError, ParseError
from services.paired.hypotheses import PairedHypothesis
from services.paired.pairs import Pair

MAX_CHARS = 700
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_SIDE_IN_LINE = re.compile(r"(?i)\b(?:model|group)\s*([12])\b")
_CHOICE = re.compile(r"(?i)^\W*(?:answer\s+)?(A|B|same|neither|tie|equal)\W*$")


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3].rstrip() + "..."


@dataclass(frozen=True)
class Axis:
    axis: str  # completes "this answer ... than the other"
    side: int  # 1 or 2: the model (or group) whose answers are more so


AXIS_FORMAT = (
    "Name up to 5 ways in which one side's answers consistently differ from the other's in style, form, "
    "tone or stance rather than topic: length, structure, formatting, formality, hedging, warmth, "
    "enthusiasm, questions to the reader, refusals, and so on. Phrase each axis so that it completes "
    "\"compared with the other answer to the same prompt, this answer ...\", for example \"is more "
    "formal\", \"uses more bulleted lists\", \"ends with a question to the reader\". Each axis must be "
    "checkable on a single pair of answers.\n"
    'Reply with a JSON array of objects {"axis": "<completion>", "side": 1 or 2}, where side is the '
    "one whose answers do this more, and nothing else.")


def axes_prompt(examples: Sequence[tuple[str, str, str, bool]]) -> str:
    """examples: (prompt, answer of model 1, answer of model 2, model 1's answer shown first)."""
    parts = ["Two AI models, model 1 and model 2, answered the same prompts. For each prompt you see "
             "both answers (in a random order).", ""]
    for n, (prompt, one, two, one_first) in enumerate(examples, 1):
        shown = [("1", one), ("2", two)] if one_first else [("2", two), ("1", one)]
        parts.append(f'<example n="{n}">\n<prompt>{_clip(prompt)}</prompt>')
        parts += [f'<answer side="{side}">{_clip(text)}</answer>' for side, text in shown]
        parts += ["</example>", ""]
    parts.append(AXIS_FORMAT)
    return "\n".join(parts)


def ends_prompt(group_1: Sequence[str], group_2: Sequence[str]) -> str:
    """The two ends of an embedding direction as groups 1 and 2 (group 1: the intervention end)."""
    parts = ["Below are two groups of answers written by AI models.", "", "Group 1:"]
    parts += [f"<answer>{_clip(t)}</answer>" for t in group_1]
    parts += ["", "Group 2:"] + [f"<answer>{_clip(t)}</answer>" for t in group_2]
    parts += ["", AXIS_FORMAT.replace("one side's answers", "one group's answers")]
    return "\n".join(parts)


def _as_axes(value: object) -> list[Axis]:
    out = []
    if isinstance(value, dict):
        value = value.get("axes", [value])
    if not isinstance(value, list):
        return out
    for item in value:
        if not isinstance(item, dict):
            continue
        axis = item.get("axis")
        side = item.get("side", item.get("model", item.get("group")))
        if isinstance(side, str):
            m = re.search(r"[12]", side)
            side = int(m.group()) if m else None
        if isinstance(axis, str) and axis.strip() and side in (1, 2) and not isinstance(side, bool):
            out.append(Axis(" ".join(axis.split()).rstrip("."), int(side)))
    return out


def parse_axes(text: str) -> list[Axis]:
    """Axes from a JSON array (bare, fenced or inside prose) or, failing that, from lines naming
    "model 1"/"model 2" (or "group"); raises ParseError when there is none."""
    candidates = [text.strip(), *(m.strip() for m in _FENCE.findall(text))]
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        candidates.append(text[start: end + 1])
    for c in candidates:
        try:
            axes = _as_axes(orjson.loads(c))
        except orjson.JSONDecodeError:
            continue
        if axes:
            return axes
    axes = []
    for line in text.splitlines():
        sides = set(_SIDE_IN_LINE.findall(line))
        if len(sides) != 1:
            continue
        rest = _SIDE_IN_LINE.sub("", line)
        rest = re.sub(r"^[\s\-*\u2022\d.)]+|[\s:;,.()\-]+$", "", rest)
        rest = re.sub(r"^[\s:;,\-]+", "", rest)
        if rest:
            axes.append(Axis(" ".join(rest.split()), int(sides.pop())))
    if not axes:
        raise ParseError(f"no axes in {text[:120]!r}")
    return axes


def judge_prompt(axis: str, prompt: str, answer_a: str, answer_b: str) -> str:
    return "\n".join([
        "Here are two answers to the same prompt.",
        f"<prompt>{_clip(prompt)}</prompt>",
        f'<answer id="A">{_clip(answer_a)}</answer>',
        f'<answer id="B">{_clip(answer_b)}</answer>',
        "",
        f"Compared with the other answer, which answer {axis}?",
        "Reply with A, B, or SAME if neither does so more than the other, and nothing else.",
    ])


def parse_choice(text: str) -> Literal["A", "B", "same"]:
    """"A", "B" or "same" from a judge's reply (also ``{"choice": "A"}``); anything else raises."""
    candidate = text.strip()
    if candidate.startswith("{"):
        try:
            obj = orjson.loads(candidate)
            candidate = str(obj.get("choice", obj.get("answer", ""))) if isinstance(obj, dict) else ""
        except orjson.JSONDecodeError:
            pass
    m = _CHOICE.match(candidate)
    if not m:
        raise ParseError(f"no A/B/SAME choice in {text[:80]!r}")
    c = m.group(1).upper()
    return c if c in ("A", "B") else "same"  # type: ignore[return-value]


def axis_hypothesis(axis: str, direction: str, proposer: str) -> PairedHypothesis:
    subject, other = (("the intervention's answer", "the base model's") if direction == "intervention"
                      else ("the base model's answer", "the intervention's"))
    text = f"compared with {other} answer to the same prompt, {subject} {axis}"
    return PairedHypothesis(text, direction, {"type": "llm_judge", "axis": axis}, proposer)  # type: ignore[arg-type]


def _words(s: str) -> set[str]:
    return set(re.findall(r"[a-z]+", s.lower()))


def deduplicate(hypotheses: Sequence[PairedHypothesis], threshold: float,
                embed: Callable[[list[str]], np.ndarray] | None = None) -> list[PairedHypothesis]:
    """Drop an axis closer than ``threshold`` to an earlier one: cosine of ``embed``'s vectors, or
    without an encoder the Jaccard overlap of their words.  The first wording is kept."""
    axes = [str(h.scorer.get("axis", h.text)) for h in hypotheses]
    if not axes:
        return []
    if embed is not None:
        v = np.asarray(embed(axes), dtype=float)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sim = v @ v.T
    else:
        w = [_words(a) for a in axes]
        sim = np.array([[len(a & b) / max(1, len(a | b)) for b in w] for a in w])
    kept: list[int] = []
    for j in range(len(axes)):
        if all(sim[j, k] < threshold for k in kept):
            kept.append(j)
    return [hypotheses[j] for j in kept]


def _proposer_name(client: LLMClient) -> str:
    return f"llm:{client.provider.name}:{client.cfg.model}"


async def ask_llm_for_axes(label_pairs: Sequence[Pair], client: LLMClient, cfg: PairedConfig, *, seed: int = 0,
                           embed: Callable[[list[str]], np.ndarray] | None = None) -> list[PairedHypothesis]:
    """``cfg.llm_rounds`` calls, each on ``cfg.llm_examples`` other label pairs where possible; a
    call that fails or cannot be read is skipped (logged by the client), never guessed."""
    rng = random.Random(seed)
    order = list(label_pairs)
    rng.shuffle(order)
    out: list[PairedHypothesis] = []
    for r in range(cfg.llm_rounds):
        chunk = [order[(r * cfg.llm_examples + j) % len(order)] for j in range(min(cfg.llm_examples, len(order)))]
        if not chunk:
            break
        intervention_is_1 = rng.random() < 0.5
        examples = []
        for p in chunk:
            one, two = (p.intervention, p.base) if intervention_is_1 else (p.base, p.intervention)
            examples.append((p.prompt, one, two, rng.random() < 0.5))
        try:
            axes = await client.complete_parsed(axes_prompt(examples), parse_axes, purpose="paired-propose")
        except LLMError:
            continue
        for a in axes:
            direction = "intervention" if (a.side == 1) == intervention_is_1 else "base"
            out.append(axis_hypothesis(a.axis, direction, _proposer_name(client)))
    return deduplicate(out, cfg.dedupe_similarity, embed)


async def ask_llm_to_name_ends(top: Sequence[str], bottom: Sequence[str], client: LLMClient) -> list[PairedHypothesis]:
    """The LLM labeler of an embedding direction: group 1 is the intervention end."""
    try:
        axes = await client.complete_parsed(ends_prompt(top, bottom), parse_axes, purpose="paired-direction")
    except LLMError:
        return []
    return [axis_hypothesis(a.axis, "intervention" if a.side == 1 else "base", _proposer_name(client) + ":ends")
            for a in axes]
