"""The request body's deadline (``jobq.web.api._within``): ``asyncio.timeout``'s behaviour,
cancellations included, with one timer."""

from __future__ import annotations

import asyncio
import sys

import pytest

from jobq.web.api import _within

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 uses asyncio.wait_for")


async def _slow() -> int:
    await asyncio.sleep(5)
    return 1


async def _ready() -> int:
    return 2


async def _one_turn() -> int:
    await asyncio.sleep(0)
    return 3


def test_answers_within_the_deadline() -> None:
    async def main() -> None:
        assert await _within(5, _ready()) == 2
        assert await _within(5, _one_turn()) == 3
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    asyncio.run(main())


def test_the_deadline_is_a_timeout_and_leaves_no_cancel_behind() -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await _within(0.05, _slow())
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        assert await _one_turn() == 3  # the task goes on normally

    asyncio.run(main())


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def main() -> None:
        async def victim() -> int:
            return await _within(5, _slow())

        t = asyncio.ensure_future(victim())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

        # The deadline and a cancel from elsewhere at once: the cancel wins, as with
        # asyncio.timeout.
        async def raced() -> int:
            return await _within(0.02, _slow())

        t = asyncio.ensure_future(raced())
        await asyncio.sleep(0.02)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())


def test_an_error_passes_through() -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("x")

    async def main() -> None:
        with pytest.raises(ValueError):
            await _within(5, boom())

    asyncio.run(main())
