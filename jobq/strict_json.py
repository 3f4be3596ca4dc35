"""Strict JSON input for the CLI, NDJSON and HTTP edges.

Python's ``json.loads`` accepts ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON
(RFC 8259) and would reach a task as a float it never expected. Every place jobq reads JSON from
a user goes through :func:`loads`, which refuses them with a ``ValueError`` naming the token.
It also turns the parser's ``RecursionError`` on absurdly nested input into a ``ValueError``.
"""

from __future__ import annotations

import json
from typing import Any


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON (no NaN or Infinity)")


def loads(text: str | bytes) -> Any:
    """``json.loads`` without the NaN/Infinity extension; nesting too deep for the parser is a
    ``ValueError`` too (not a ``RecursionError``)."""
    try:
        return json.loads(text, parse_constant=_refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None
