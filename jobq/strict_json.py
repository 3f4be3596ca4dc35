"""Strict JSON input for the CLI, NDJSON and HTTP edges.

Python's ``json.loads`` accepts ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON
(RFC 8259) and would reach a task as a float it never expected. Every place jobq reads JSON from
a user goes through :func:`loads`, which refuses them with a ``ValueError`` naming the token, and
refuses a number too large for a float (``1e999``) rather than storing it as infinity. It also
turns the parser's ``RecursionError`` on absurdly nested input into a ``ValueError``.

Text is UTF-8 (RFC 8259 §8.1), the same on every edge: a leading UTF-8 byte order mark is
ignored (the RFC lets a parser do so), while UTF-16 and UTF-32 bodies, which ``json.loads``
would otherwise guess and accept from bytes only, are refused with a ``ValueError`` saying so.
"""

from __future__ import annotations

import json
import math
from typing import Any

_BOM = "\ufeff"
_UTF8_BOM = b"\xef\xbb\xbf"


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON (no NaN or Infinity)")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is too large (beyond a 64-bit float)")
    return value


def _decode(data: bytes) -> str:
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    elif data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") or (
        len(data) >= 4 and data[0] == 0 and data[1] == 0
    ):
        raise ValueError("JSON must be UTF-8, this is UTF-32")
    elif data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) >= 2 and (data[0] == 0 or data[1] == 0)):
        raise ValueError("JSON must be UTF-8, this is UTF-16")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"JSON must be UTF-8 (byte {exc.start}: {exc.reason})") from None


#: One decoder for every call (``json.loads`` with options builds a new one each time, a fifth of
#: the parse of a small body); stateless between calls, as ``json``'s own default decoder is.
_DECODER = json.JSONDecoder(parse_constant=_refuse, parse_float=_float)


def loads(text: str | bytes) -> Any:
    """``json.loads`` without the NaN/Infinity extension or overflowing numbers, of UTF-8 only
    (bytes are decoded strictly; a leading byte order mark is skipped); nesting too deep for the
    parser is a ``ValueError`` too (not a ``RecursionError``)."""
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text))
    elif text.startswith(_BOM):
        text = text[1:]
    try:
        if text.startswith(_BOM):  # a second one: refused with json.loads's own words
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
