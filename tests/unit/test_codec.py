"""The msgpack codec (RELIABILITY SEC3): plain data only, never pickle, and every decode failure
is a jobq.DecodeError."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jobq
from jobq import codec

JOBQ_DIR = Path(jobq.__file__).parent

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


def is_plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return True
    if isinstance(v, list):
        return all(is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, (str, bytes)) and is_plain(x) for k, x in v.items())
    return False


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_decode_random_bytes_gives_plain_data_or_decode_error(data: bytes) -> None:
    try:
        value = codec.decode(data)
    except jobq.DecodeError:
        return
    assert is_plain(value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\xff\xff", b"\xc7\x01\x05x", b"\xd9\x05ab"]),
        max_size=40,
    ),
    st.binary(max_size=8),
)
def test_decode_structured_garbage(parts: list[bytes], tail: bytes) -> None:
    try:
        assert is_plain(codec.decode(b"".join(parts) + tail))
    except jobq.DecodeError:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used
        b"\x91" * 100_000,  # deep nesting
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc7\x01\x05x",  # ext type
        b"\xd6\xff\x00\x00\x00\x00",  # the timestamp ext type
        b"\x81\x01\x02",  # int map key
        b"\x81\xc4\x01b\x01",  # bytes map key (msgpack's strict_map_key allows it)
        b"\x92\x90\x81\xa1k\x81\xc4\x01b\x01",  # a nested one, as [args, kwargs]
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\x01\x02",  # extra data
    ],
)
def test_decode_refuses_with_decode_error(data: bytes) -> None:
    with pytest.raises(jobq.DecodeError):
        codec.decode(data)


def test_decode_refuses_over_the_limit_and_non_bytes() -> None:
    with pytest.raises(jobq.DecodeError, match="limit"):
        codec.decode(msgpack.packb("x" * 100), max_bytes=10)
    with pytest.raises(jobq.DecodeError):
        codec.decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(jobq.DecodeError, match="args, kwargs"):
        codec.decode_payload(msgpack.packb({"a": 1}))


@settings(max_examples=150, deadline=None)
@given(st.lists(plain, max_size=4), st.dictionaries(st.text(), plain, max_size=4))
def test_payload_round_trip(args: list[Any], kwargs: dict[str, Any]) -> None:
    data = codec.encode_payload(tuple(args), kwargs, 1 << 20)
    assert codec.decode_payload(data) == (args, kwargs)


def test_encode_refuses_what_would_not_decode() -> None:
    for bad in (
        [object()],
        [{1: 2}],
        [{b"k": 2}],
        [msgpack.ExtType(3, b"")],
        [2**64],
        ["\udcff"],
        [{"t": msgpack.Timestamp(1)}],
    ):
        with pytest.raises(jobq.EncodeError):
            codec.encode_payload(bad, {}, 1 << 20)
    with pytest.raises(jobq.PayloadTooLarge):
        codec.encode_payload(["x" * 100], {}, 50)
    with pytest.raises(jobq.EncodeError, match="result"):
        codec.encode_result("x" * 100, 50)
    assert math.isnan(codec.decode(codec.encode_result(math.nan, 100)))


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}


def test_no_pickle_anywhere_in_the_package() -> None:
    """Static check (SEC3): no module of jobq imports pickle and friends, or calls yaml.load."""
    offenders = []
    for path in sorted(JOBQ_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in {
                    ("yaml", "load"),
                    ("pickle", "loads"),
                }:
                    offenders.append(f"{path.name}:{node.lineno} {f.value.id}.{f.attr}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "__import__"
            ):
                offenders.append(f"{path.name}:{node.lineno} __import__")
            for n in names:
                if n.split(".")[0] in FORBIDDEN_MODULES:
                    offenders.append(f"{path.name}:{node.lineno} import {n}")
    assert not offenders


def test_decode_100k_random_byte_strings_fast() -> None:
    """SEC3: 100,000 random byte strings (seeded, half starting with a container header) decode
    to plain data or raise DecodeError, with p99 under 1 ms."""
    import random
    import time

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    heads = [b"\x92", b"\x93", b"\x81", b"\xdc\x00\x10", b"\xde\x00\x04", b""]
    times = []
    for _ in range(100_000):
        data = rng.choice(heads) + rng.randbytes(rng.randrange(0, 48))
        t0 = time.perf_counter()
        try:
            value = codec.decode(data)
        except jobq.DecodeError:
            value = None
        times.append(time.perf_counter() - t0)
        assert is_plain(value), (seed, data)
    times.sort()
    assert times[99_000] < 0.001, f"p99 {times[99_000] * 1e3:.3f} ms (seed {seed})"
