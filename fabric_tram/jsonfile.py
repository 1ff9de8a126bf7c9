"""Strict JSON files written atomically (a leaf: the standard library only).

A diverged run can produce NaN or infinite metrics; bare ``NaN`` is not JSON for strict readers (``jq``,
JavaScript, most JSON libraries), so non-finite numbers are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite_or_null(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` through a temporary file and a rename: a reader never sees half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite_or_null(obj), indent=indent, allow_nan=False))
    os.replace(tmp, path)
    return path
