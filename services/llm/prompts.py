"""Prompt templates for labelling, scoring, generative validation and ground-truth judging.

Wording is our own.  "Model 1" is always the side a hypothesis describes (the intervention model
in the pipeline), "model 2" the comparison side.  Quoted texts are fenced in ``<text>`` tags and
cut to ``max_chars`` so one long generation cannot blow a call's token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

DEFAULT_MAX_CHARS = 800


def _clip(text: str, max_chars: int) -> str:
    text = text.strip()
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."


def _numbered(texts: Sequence[str], max_chars: int) -> str:
    return "\n".join(f'<text n="{i}">{_clip(t, max_chars)}</text>' for i, t in enumerate(texts, 1))


def contrastive_label_prompt(texts_a: list[str], texts_b: list[str], previous: list[str], *,
                             max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Ask what sets model 1's texts apart from model 2's; with ``previous`` labels, ask for a new theme."""
    parts = [
        "Two language models answered similar prompts. Below are samples from each.",
        "",
        "Samples from model 1:",
        _numbered(texts_a, max_chars),
        "",
        "Samples from model 2:",
        _numbered(texts_b, max_chars),
        "",
        "Identify one pattern that is common in model 1's samples and rare or absent in model 2's: "
        "a topic, stance, style, format or recurring phrase. Be specific enough that someone could "
        "use your description to tell a new sample of model 1 from one of model 2.",
    ]
    if previous:
        parts += [
            "",
            "These differences have already been described; do not repeat them or restate them in "
            "other words, but find a different pattern:",
            *(f"- {label}" for label in previous),
        ]
    parts += ["", "Answer with the description only, in fewer than 100 words."]
    return "\n".join(parts)


def score_text_prompt(hypothesis: str, text: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Ask for a 0-100 rating of how likely ``text`` came from model 1 given the hypothesis."""
    return "\n".join([
        "We compare two language models. Here is a description of how model 1's outputs differ "
        "from model 2's:",
        f"<description>{hypothesis.strip()}</description>",
        "",
        "Here is one output from one of the two models:",
        f"<text>{_clip(text, max_chars)}</text>",
        "",
        "Using only the description, rate from 0 to 100 how likely it is that this output was "
        "written by model 1 (0: surely model 2, 50: no idea, 100: surely model 1).",
        "Reply with the number alone.",
    ])


def generative_prompt(hypothesis: str, side: Literal[1, 2], n: int) -> str:
    """Ask for ``n`` short texts typical of model 1 (showing the pattern) or model 2 (lacking it)."""
    if side not in (1, 2):
        raise ValueError(f"side must be 1 or 2, got {side!r}")
    if side == 1:
        target = "model 1: each text should clearly show the pattern described"
    else:
        target = ("model 2: each text should be a plausible output of a similar model that does NOT "
                  "show the pattern described, otherwise alike in topic and length")
    return "\n".join([
        "We compare two language models. Model 1's outputs differ from model 2's as follows:",
        f"<description>{hypothesis.strip()}</description>",
        "",
        f"Write {n} short, varied texts (one to three sentences each) that are typical of {target}.",
        f"Reply with a JSON array of exactly {n} strings and nothing else.",
    ])


def ground_truth_prompt(behaviour: str, hypothesis: str) -> str:
    """Ask a judge how closely a hypothesis matches a planted behaviour, 1-100, as JSON."""
    return "\n".join([
        "A language model was deliberately altered to show a behaviour. An automated analysis then "
        "proposed a description of how the altered model differs from the original.",
        f"<behaviour>{behaviour.strip()}</behaviour>",
        f"<proposed>{hypothesis.strip()}</proposed>",
        "",
        "Rate from 1 to 100 how well the proposed description captures the behaviour "
        "(1: unrelated, 50: partly overlapping, 100: the same behaviour).",
        'Reply with a JSON object of the form {"score": <number>} and nothing else.',
    ])
