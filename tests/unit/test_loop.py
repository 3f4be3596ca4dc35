"""The worker's event loop (jobq/worker/loop.py): timers to the microsecond, I/O still through epoll."""

from __future__ import annotations

import asyncio
import ctypes
import socket
import statistics
import sys
import threading
import time

import pytest

from jobq.worker import loop as jobq_loop

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the precise selector is for epoll (Linux)")

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - the test extras bring it (jobq[web])
    HAVE_UVLOOP = False

needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")


async def _median_lateness_ms(delay: float, samples: int) -> float:
    loop = asyncio.get_running_loop()
    late = []
    for _ in range(samples):
        t0 = loop.time()
        await asyncio.sleep(delay)
        late.append((loop.time() - t0 - delay) * 1000)
    return statistics.median(late)


def test_sub_millisecond_timers_fire_on_time() -> None:
    # asyncio's epoll loop rounds every wait up to a whole millisecond: a 0.3 ms sleep takes
    # about 1 ms (0.7 ms late). jobq's loop waits to the microsecond.
    late = jobq_loop.run(_median_lateness_ms(0.0003, 200), kind="asyncio")
    assert late < 0.35, f"median lateness {late:.3f} ms"


def _timer_slack_ns() -> int:
    return int(ctypes.CDLL(None).prctl(30, 0, 0, 0, 0))  # PR_GET_TIMERSLACK


def test_run_asks_for_a_tight_timer_slack() -> None:
    # Linux lets a timed wait end up to 50 us late by default (the thread's timer slack); the
    # worker's loop asks for 1 us, for itself and the threads it starts (sync tasks, heartbeat).
    seen: dict[str, int] = {}

    async def main() -> None:
        seen["loop"] = _timer_slack_ns()
        seen["thread"] = await asyncio.to_thread(_timer_slack_ns)

    def node() -> None:
        ctypes.CDLL(None).prctl(29, 50_000, 0, 0, 0)  # PR_SET_TIMERSLACK: Linux's default
        seen["before"] = _timer_slack_ns()
        jobq_loop.run(main())

    t = threading.Thread(target=node)
    t.start()
    t.join()
    assert seen == {"before": 50_000, "loop": 1_000, "thread": 1_000}


def test_io_wakes_a_long_timed_wait_at_once() -> None:
    a, b = socket.socketpair()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()
        loop.add_reader(a.fileno(), lambda: got.done() or got.set_result(a.recv(10)))
        sent = threading.Event()

        def write() -> None:
            time.sleep(0.05)
            sent.set()
            b.send(b"x")

        threading.Thread(target=write).start()
        timer = loop.call_later(30, lambda: None)  # the loop waits with a 30 s timeout
        data = await asyncio.wait_for(got, 10)
        woke = time.monotonic()
        timer.cancel()
        loop.remove_reader(a.fileno())
        assert data == b"x" and sent.is_set()
        return woke

    try:
        t0 = time.monotonic()
        woke = jobq_loop.run(main(), kind="asyncio")
        assert woke - t0 < 2.0
    finally:
        a.close()
        b.close()


def test_run_returns_the_result_and_closes_the_loop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return 42

    assert jobq_loop.run(main(), kind="asyncio") == 42
    assert isinstance(seen[0], asyncio.SelectorEventLoop)
    assert seen[0].is_closed()


def test_run_worker_uses_the_precise_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobq

    monkeypatch.setenv(jobq_loop.LOOP_ENV, "asyncio")
    from jobq.worker import WorkerConfig, run_worker

    made: list[asyncio.AbstractEventLoop] = []
    real = jobq_loop.new_event_loop

    def spy() -> asyncio.AbstractEventLoop:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(jobq_loop, "new_event_loop", spy)
    monkeypatch.setattr(jobq.worker.Worker, "run", _noop_run)
    app = jobq.JobQ("redis://127.0.0.1:1/0")  # never connected: run() is replaced
    run_worker(app, WorkerConfig(queues=[("q", 1)], burst=True))
    assert len(made) == 1


async def _noop_run(self: object) -> None:
    await asyncio.sleep(0)


# -- the loop choice: uvloop when installed, else asyncio's; JOBQ_WORKER_LOOP / --loop -----------


def _no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # "import uvloop" raises ImportError


async def _kind() -> str:
    return jobq_loop.running_loop_kind()


@needs_uvloop
def test_auto_runs_uvloop_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(jobq_loop.LOOP_ENV, raising=False)
    assert jobq_loop.loop_kind() == "uvloop"
    assert jobq_loop.run(_kind()) == "uvloop"
    monkeypatch.setenv(jobq_loop.LOOP_ENV, "AUTO")
    assert jobq_loop.run(_kind()) == "uvloop"


def test_auto_runs_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(jobq_loop.LOOP_ENV, raising=False)
    _no_uvloop(monkeypatch)
    assert jobq_loop.loop_kind() == "asyncio"
    assert jobq_loop.run(_kind()) == "asyncio"


@pytest.mark.parametrize("how", ["env", "argument"])
def test_asyncio_can_be_chosen_over_an_installed_uvloop(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    seen: list[object] = []

    async def main() -> str:
        seen.append(getattr(asyncio.get_running_loop(), "_selector", None))
        return jobq_loop.running_loop_kind()

    if how == "env":
        monkeypatch.setenv(jobq_loop.LOOP_ENV, "asyncio")
        kind = jobq_loop.run(main())
    else:
        monkeypatch.setenv(jobq_loop.LOOP_ENV, "uvloop")  # the argument wins
        kind = jobq_loop.run(main(), kind="asyncio")
    assert kind == "asyncio"
    assert isinstance(seen[0], jobq_loop.PreciseEpollSelector)  # timers to the microsecond


@needs_uvloop
def test_uvloop_can_be_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jobq_loop.LOOP_ENV, "uvloop")
    assert jobq_loop.run(_kind()) == "uvloop"


def test_uvloop_asked_for_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_uvloop(monkeypatch)
    coro = _kind()
    with pytest.raises(jobq_loop.LoopChoiceError, match="uvloop does not import"):
        jobq_loop.run(coro, kind="uvloop")
    assert coro.cr_frame is None  # closed, not left to warn "never awaited"


def test_an_unknown_loop_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jobq_loop.LOOP_ENV, "trio")
    with pytest.raises(jobq_loop.LoopChoiceError, match="JOBQ_WORKER_LOOP='trio'"):
        jobq_loop.loop_kind()


@needs_uvloop
def test_run_worker_runs_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobq
    from jobq.worker import WorkerConfig, run_worker

    kinds: list[str] = []

    async def run(self: object) -> None:
        kinds.append(jobq_loop.running_loop_kind())

    monkeypatch.delenv(jobq_loop.LOOP_ENV, raising=False)
    monkeypatch.setattr(jobq.worker.Worker, "run", run)
    app = jobq.JobQ("redis://127.0.0.1:1/0")  # never connected: run() is replaced
    run_worker(app, WorkerConfig(queues=[("q", 1)], burst=True))
    monkeypatch.setenv(jobq_loop.LOOP_ENV, "asyncio")
    run_worker(app, WorkerConfig(queues=[("q", 1)], burst=True))
    assert kinds == ["uvloop", "asyncio"]
