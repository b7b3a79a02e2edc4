"""What a request's JSON body and form fields may hold (docs/RELIABILITY.md H10): anything else
is a 422 with a JSON error, never a 500 — NaN and Infinity, numbers past float range (1e400),
integers of thousands of digits, arrays nested a million deep, bytes that are not UTF-8, wrong
types."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from imgclf.serve.limits import HTTPProblem


def parse_json(body: bytes) -> Any:
    """A request's JSON; 422 for anything Python's parser refuses (RELIABILITY H10)."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:  # "[" nested a million deep: the C parser stops at the limit
        raise HTTPProblem(422, "invalid JSON", "nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and digit-limit errors are ValueErrors too
        raise HTTPProblem(422, "invalid JSON", str(e)) from None


def _refuse_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are not JSON (RFC 8259); Python accepts them by default.
    raise ValueError(f"{name} is not a JSON number")


def top_k_value(raw: Any) -> int | None:
    """top_k from a form field (bytes) or JSON: an integer ≥ 1, else 422 (never a 500)."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace").strip()
        value = int(text) if re.fullmatch(r"[+-]?[0-9]{1,18}", text) else None
    elif isinstance(raw, float):  # JSON: 3.0 is fine; 1.5 and 1e400 (inf) are not
        value = int(raw) if math.isfinite(raw) and raw.is_integer() else None
    else:  # JSON: true and "2" are not integers
        value = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    if value is None:
        detail = f"top_k must be an integer, got {_short(raw)}"
        raise HTTPProblem(422, "invalid top_k", detail)
    if value < 1:
        raise HTTPProblem(422, "invalid top_k", "top_k must be at least 1")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
