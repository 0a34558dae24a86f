"""Contrast examples for one finding: its side's held-out texts beside the other model's answers.

Chosen per finding, not per run: the finding's own cluster's held-out texts (never shown to its
labeler), those showing most of the finding's keywords first, each beside the other model's answer
to the same prompt (its pair partner) when texts are paired.  Every text is escaped before the
keywords are marked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from services.sink.formatting import DASH
from services.sink.run_view import RunView, TextRow

EXAMPLES = 3


def side_badge(role: Any) -> str:
    r = escape(str(role or "?"))
    return f"<span class='side {r}'>{r}</span>"


def _rank_key(hid: str, text_id: str) -> bytes:
    return hashlib.blake2b(f"{hid}\x1f{text_id}".encode(), digest_size=8).digest()


def _text_of(view: RunView, ref: Mapping[str, Any]) -> TextRow | None:
    tid = str(ref.get("text_id"))
    row = view.texts.get(tid)
    if row is not None:
        return row
    text = str(ref.get("text") or "")
    return TextRow(tid, str(ref.get("role")), "", str(ref.get("prompt_id") or ""), "", text, "") if text else None


def _keyword_hits(text: str, keywords: Sequence[str]) -> int:
    low = text.lower()
    return sum(1 for k in keywords if k and k.lower() in low)


def contrast_examples(view: RunView, row: Mapping[str, Any], k: int = EXAMPLES) \
        -> list[tuple[TextRow, TextRow | None, bool]]:
    """Up to ``k`` (held-out text of the finding's side, contrast from the other side, same prompt?).

    The side's texts are the held-out texts of this finding's cluster, those showing most of the
    finding's keywords first (ties in an order drawn from the hypothesis id, so two findings on one
    cluster do not show the same texts).  The contrast is the same prompt's answer from the other
    model when the texts are paired, else another held-out text of the other side."""
    hid = str(row.get("hypothesis_id"))
    src = view.hypotheses.get(hid) or view.candidates.get(str(row.get("candidate_id"))) or {}
    refs = list(src.get("holdout_texts") or [])
    side = row.get("direction")
    keywords = list(row.get("keywords") or [])
    mine = [t for t in (_text_of(view, r) for r in refs if r.get("role") == side) if t is not None]
    mine.sort(key=lambda t: (-_keyword_hits(t.text, keywords), _rank_key(hid, t.text_id)))
    others = [t for t in (_text_of(view, r) for r in refs if r.get("role") != side) if t is not None]
    others.sort(key=lambda t: _rank_key(hid, t.text_id))
    out: list[tuple[TextRow, TextRow | None, bool]] = []
    used: set[str] = set()
    for t in mine[:k]:
        partner = view.partners.get(t.text_id)
        if partner is not None:
            out.append((t, partner, True))
            used.add(partner.text_id)
            continue
        spare = next((o for o in others if o.text_id not in used), None)
        if spare is not None:
            used.add(spare.text_id)
        out.append((t, spare, False))
    return out


def _highlight(text: str, keywords: Sequence[str]) -> str:
    html = escape(text)
    words = sorted({k for k in keywords if k and k.strip()}, key=len, reverse=True)
    if not words:
        return html
    pattern = "|".join(r"\W+".join(re.escape(escape(w)) for w in k.split()) for k in words)
    return re.sub(f"(?i)\\b({pattern})\\b", r"<mark>\1</mark>", html)


def examples_html(view: RunView, row: Mapping[str, Any]) -> str:
    ex = contrast_examples(view, row)
    if not ex:
        return "<p class='muted'>No held-out texts of this finding were recorded.</p>"
    side = str(row.get("direction") or "?")
    other = "base" if side == "intervention" else "intervention"
    kw = list(row.get("keywords") or [])
    rows = []
    for mine, contrast, same_prompt in ex:
        prompt = mine.prompt or (f"prompt {mine.prompt_id}" if mine.prompt_id else "")
        note = "" if contrast is None or same_prompt else "<br><span class='muted'>(another prompt)</span>"
        rows.append([f"<span class='prompt'>{escape(prompt[:200])}</span>", _highlight(mine.text, kw),
                     (_highlight(contrast.text, kw) if contrast else DASH) + note])
    return ("<table class='ex'><thead><tr><th>prompt</th><th>" + side_badge(side) + "held out, this cluster</th><th>"
            + side_badge(other) + "same prompt</th></tr></thead><tbody>"
            + "".join(f"<tr><td class='prompt'>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
            + "</tbody></table>")
