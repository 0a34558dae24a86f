"""False and true validations per tier and per hypothesis source: the table behind
tests/test_validator_null.py, with the test's own helpers (hypothesis set, ``decide`` per tier).

    .venv/bin/python bench/validator_null.py [--replicas 7]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_validator_null import EXACT_NULLS, NULLS, TIERS, decisions, tier_config  # noqa: E402

from services.core.config import EmbedderConfig  # noqa: E402
from services.embedder.hashing import HashingEncoder  # noqa: E402
from services.hypothesis_sets import MemoEncoder, build_set  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=7)
    args = ap.parse_args()
    hs = await build_set(args.replicas, 20, sources=("true", *NULLS))
    enc = MemoEncoder(HashingEncoder(EmbedderConfig(backend="hashing")))
    rows = (("exact nulls, level alpha, min_auc 0.5", EXACT_NULLS, 0.5, True),
            ("swapped labels, level alpha, min_auc 0.5", ("swapped",), 0.5, True),
            ("swapped labels, level alpha, min_auc 0.6", ("swapped",), 0.6, True),
            ("every null, as shipped (LORD++ stream, min_auc 0.6)", NULLS, 0.6, False),
            ("true, as shipped", ("true",), 0.6, False))
    for kind in TIERS:
        for label, sources, min_auc, per in rows:
            items = hs.of(*sources)
            got = await decisions(tier_config(kind, min_auc), enc, items, per_hypothesis=per)
            by = Counter(x.source for x, d in zip(items, got, strict=True) if d == "validated")
            print(f"{kind:9s} {label:52s} validated {got.count('validated'):3d}/{len(items)} {dict(by)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
