"""The last error a worker keeps on a failed job: the one-line error, then the task's traceback,
cut from its start so the frames nearest the raise stay within the stored size."""

from __future__ import annotations

from jobq.worker.acker import MAX_STORED_ERROR, stored_error
from jobq.worker.executor import _trace


def _raise_here() -> None:
    raise ValueError("no good")


def test_traceback_follows_the_one_line_error() -> None:
    try:
        _raise_here()
    except ValueError as exc:
        text = stored_error("ValueError: no good", _trace(exc))
    first, blank, rest = text.split("\n", 2)
    assert first == "ValueError: no good" and blank == ""
    assert rest.startswith("Traceback (most recent call last):")
    assert "in _raise_here" in rest and rest.endswith("ValueError: no good")


def test_a_long_traceback_keeps_its_end() -> None:
    trace = "Traceback (most recent call last):\n" + "".join(f"  frame {i}\n" for i in range(2000)) + "E: x"
    text = stored_error("E: x", trace)
    assert len(text) <= MAX_STORED_ERROR
    assert text.startswith("E: x\n\n…") and text.endswith("frame 1999\nE: x")


def test_no_traceback_or_no_room_keeps_the_error_alone() -> None:
    assert stored_error("timeout: ran longer than 1 s", None) == "timeout: ran longer than 1 s"
    long = "E: " + "x" * 3900
    assert stored_error(long, "Traceback ...") == long
