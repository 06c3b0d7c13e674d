"""JSON Lines files (prompt sets, needle instances): one object per line, blank lines allowed."""

from __future__ import annotations

import json
from typing import Iterator


def json_lines(text: str, origin: str, error: type[Exception]) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of ``text``, counted from 1; a line that is not JSON
    raises ``error`` naming ``origin:line`` and the column."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{origin}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
