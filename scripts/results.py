"""How the measuring scripts hand over what they measured: one JSON document,
stamped with when it was measured, printed and (with --out) written where
the docs cite it from."""

from __future__ import annotations

import json
import pathlib
import time


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def emit(result: dict, out: str = "") -> int:
    """Prints `result` as JSON and writes it to `out` when given; 0 (the exit status)."""
    text = json.dumps(result, indent=2)
    if out:
        pathlib.Path(out).write_text(text + "\n")
    print(text)
    return 0
