"""Numbers as a reader wants them: p-values and e-values in short scientific notation, shares as
percentages, differences in percentage points.  Shared by the HTML report and the terminal table,
so both say the same thing the same way.  Missing values (None, NaN, inf) print as an en dash."""

from __future__ import annotations

import math
from typing import Any

DASH = "–"


def finite(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def sci(x: float, digits: int = 2) -> str:
    """3.8e11, 1.1e-15: mantissa with ``digits`` significant figures, no '+' or leading zeros."""
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_p(x: Any) -> str:
    """A p-value: 0.034 / 0.0012 / 3.1e-10; exactly 0 (underflow) as '< 1e-300'."""
    f = finite(x)
    if f is None:
        return DASH
    if f <= 0:
        return "< 1e-300"
    if f >= 0.001:
        return f"{f:.3g}" if f < 1 else "1"
    return sci(f)


def fmt_e(x: Any) -> str:
    """An e-value (evidence ratio): 0.12 / 3.5 / 420 / 3.8e11."""
    f = finite(x)
    if f is None:
        return DASH
    if f >= 10_000:
        return sci(f)
    if f >= 100:
        return f"{f:.0f}"
    return f"{f:.2g}" if f < 10 else f"{f:.1f}"


def fmt_pct(x: Any, digits: int = 0) -> str:
    """A share in [0, 1] as a percentage: 0.4583 -> '46%'; tiny non-zero shares keep a digit."""
    f = finite(x)
    if f is None:
        return DASH
    if digits == 0 and 0 < abs(f) < 0.01:
        digits = 1
    return f"{100 * f:.{digits}f}%"


def fmt_pp(x: Any, digits: int = 1) -> str:
    """A difference of two shares in percentage points, signed: +4.6 pp."""
    f = finite(x)
    return DASH if f is None else f"{100 * f:+.{digits}f} pp"


def fmt_num(x: Any, digits: int = 2) -> str:
    """A plain statistic such as an AUC: fixed decimals."""
    f = finite(x)
    return DASH if f is None else f"{f:.{digits}f}"


def fmt_ci(lo: Any, hi: Any, fmt: Any = fmt_num) -> str:
    """'[lo, hi]' with the given formatter, or '' when either end is missing."""
    if finite(lo) is None or finite(hi) is None:
        return ""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def fmt_int(x: Any) -> str:
    f = finite(x)
    return DASH if f is None else f"{int(f):,}"


def fmt_duration(s: Any) -> str:
    f = finite(s)
    if f is None:
        return DASH
    return f"{f:.1f} s" if f < 120 else f"{f / 60:.1f} min"
