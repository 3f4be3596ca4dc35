"""msgpack encoding of task arguments and results. Never pickle.

A job's payload is ``msgpack([args, kwargs])``; a result is ``msgpack(value)``. Lua never decodes
either. Only plain data crosses the wire: None, bool, int, float, str, bytes, lists (tuples become
lists) and maps with string keys. Decoding refuses ext types, non-string map keys and anything over
the payload limit, and maps every msgpack failure to :class:`jobq.DecodeError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from jobq.errors import DecodeError, EncodeError, PayloadTooLarge

#: Default limit on an encoded payload (args + kwargs), in bytes.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: Hard ceiling on what the decoder accepts, whatever the configured limit.
_DECODE_CEILING = 512 * 1024 * 1024


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not allowed in jobq payloads")


#: The encodings of msgpack's timestamp extension (type -1): fixext 4, fixext 8 and ext 8 with
#: 12 bytes. msgpack decodes it into a ``msgpack.Timestamp`` without calling ``ext_hook``.
_TIMESTAMP_MARKERS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")


def _find_timestamp(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, msgpack.Timestamp):
            return True
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return False


def _str_keys(d: dict[Any, Any]) -> dict[Any, Any]:
    # strict_map_key lets bytes keys through as well as str: plain data has str keys only.
    for k in d:
        if type(k) is not str:
            raise DecodeError(f"map key {k!r} is not a string")
    return d


def _unpack(data: bytes) -> Any:
    # The size limit is checked by the callers before unpacking.
    value = msgpack.unpackb(
        data, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True, object_hook=_str_keys
    )
    # Only when the bytes could hold a timestamp extension is the value walked (rare).
    if any(m in data for m in _TIMESTAMP_MARKERS) and _find_timestamp(value):
        raise DecodeError("msgpack timestamp extension is not allowed in jobq payloads")
    return value


def _pack(value: Any, field: str) -> bytes:
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{field}: cannot be encoded with msgpack: {exc}", field) from None
    return data


def _check_round_trip(data: bytes, field: str) -> None:
    """Refuse values that encode but would not decode under the strict rules (int map keys, ext
    types), so a job that is accepted can always be run."""
    try:
        _unpack(data)
    except (DecodeError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EncodeError(f"{field}: not plain data ({exc})", field) from None


#: Types whose msgpack encoding always decodes back under the strict rules (exact types only:
#: a subclass may pack differently).
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def _all_scalars(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> bool:
    scalars = _SCALARS
    for v in args:
        if type(v) not in scalars:
            return False
    for k, v in kwargs.items():
        if type(k) is not str or type(v) not in scalars:
            return False
    return True


def encode_payload(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], max_bytes: int) -> bytes:
    """Encode task arguments; raise :class:`EncodeError` or :class:`PayloadTooLarge`.

    The round-trip check is skipped when every argument is a plain scalar and every ``kwargs``
    key a ``str``: msgpack then writes no ext type and no other map, and whatever ``packb``
    accepts of those types decodes back unchanged."""
    data = _pack([list(args), kwargs], "args")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"payload: {len(data)} bytes encoded is over the limit of {max_bytes} bytes")
    if not _all_scalars(args, kwargs):
        _check_round_trip(data, "args")
    return data


def decode_payload(data: bytes, max_bytes: int = _DECODE_CEILING) -> tuple[list[Any], dict[str, Any]]:
    """Decode a payload into ``(args, kwargs)``; raise :class:`DecodeError` on anything else."""
    value = decode(data, max_bytes)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], list)
        or not isinstance(value[1], dict)
    ):
        raise DecodeError("payload: expected [args, kwargs]")
    return value[0], value[1]


def encode_result(value: Any, max_bytes: int) -> bytes:
    """Encode a task's return value. Over-large or non-plain results raise :class:`EncodeError`."""
    data = _pack(value, "result")
    if len(data) > max_bytes:
        raise EncodeError(f"result: {len(data)} bytes is over the limit of {max_bytes}", "result")
    _check_round_trip(data, "result")
    return data


def decode(data: bytes, max_bytes: int = _DECODE_CEILING) -> Any:
    """Decode any jobq msgpack value; every failure is a :class:`DecodeError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"{len(data)} bytes is over the decode limit of {max_bytes}")
    try:
        return _unpack(bytes(data))
    except DecodeError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
        # ExtraData, FormatError and StackError all derive from these.
        raise DecodeError(f"invalid msgpack: {type(exc).__name__}: {exc}") from None
