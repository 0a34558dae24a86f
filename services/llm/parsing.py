"""Strict parsers for LLM answers: a failure raises ``ParseError``, never a silent default.

The research code turned every unparsable score into 0.5, which biased AUCs towards chance
without anyone noticing.  Here a parser either returns a value it is sure of or raises, and the
client re-asks once before giving up (``LLMClient.complete_parsed``).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from services.llm.errors import ParseError  # an LLMError (and a ValueError), defined with its siblings

__all__ = ["ParseError", "parse_json_array", "parse_json_object", "parse_score"]

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_OUT_OF_100 = re.compile(rf"({_NUMBER})\s*(?:/|out\s+of)\s*100(?![\d.])", re.IGNORECASE)
_LABELLED = re.compile(rf"\b(?:score|rating|answer)\s*[:=]?\s*\**\s*({_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(rf"(?<![\w.]){_NUMBER}(?!\w)")


def _snippet(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _unique_value(matches: list[str], text: str, what: str) -> float:
    values = {float(m) for m in matches}
    if len(values) > 1:
        raise ParseError(f"ambiguous {what}: {sorted(values)} in {_snippet(text)!r}")
    return values.pop()


def _score_from_json(text: str) -> float | None:
    try:
        obj = parse_json_object(text)
    except ParseError:
        return None
    value = obj.get("score")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_score(text: str) -> float:
    """A 0-100 rating in ``text``, returned divided by 100 (so 0..1).

    Accepts ``73``, ``Score: 73``, ``73/100``, ``73 out of 100``, ``{"score": 73}``.  Raises
    ``ParseError`` when there is no number, when different numbers compete, or when the number is
    outside 0..100.
    """
    value = _score_from_json(text)
    if value is None:
        for pattern, what in ((_OUT_OF_100, "x/100 score"), (_LABELLED, "labelled score"),
                              (_ANY_NUMBER, "number")):
            found = pattern.findall(text)
            if found:
                value = _unique_value(found, text, what)
                break
    if value is None:
        raise ParseError(f"no score in {_snippet(text)!r}")
    if not 0.0 <= value <= 100.0:
        raise ParseError(f"score {value:g} outside 0..100 in {_snippet(text)!r}")
    return value / 100.0


def _json_candidates(text: str, opener: str, closer: str) -> list[str]:
    """The whole text, each fenced block, and the outermost bracketed span, in that order."""
    out = [text.strip()]
    out.extend(m.strip() for m in _FENCE.findall(text))
    start, end = text.find(opener), text.rfind(closer)
    if 0 <= start < end:
        out.append(text[start : end + 1])
    return out


def _parse_json(text: str, kind: type, opener: str, closer: str) -> Any:
    for candidate in _json_candidates(text, opener, closer):
        try:
            value = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, kind):
            return value
    raise ParseError(f"no JSON {kind.__name__} in {_snippet(text)!r}")


def parse_json_array(text: str) -> list[str]:
    """A JSON array of strings, also when wrapped in a ```json fence or surrounded by prose."""
    value = _parse_json(text, list, "[", "]")
    if not all(isinstance(v, str) for v in value):
        raise ParseError(f"JSON array holds non-strings: {_snippet(text)!r}")
    return value


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object, also when wrapped in a ```json fence or surrounded by prose."""
    return _parse_json(text, dict, "{", "}")  # type: ignore[no-any-return]
