"""The async producer API (``aenqueue``, ``aenqueue_many``, ``astatus``, ``ainfo``, ``aresult``,
``acancel``) and results woken by completion notices, against a real redis-server and a real
worker process. With ``JOBQ_TEST_REDIS=cluster`` the same tests run on a Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import jobq
from jobq import JobQ, JobState, errors
from tests.harness import result_tasks as rt
from tests.harness.proxy_fixtures import chaos_proxy as chaos_proxy
from tests.harness.proxy_fixtures import thread_workers as thread_workers
from tests.harness.worker_process import worker_process

pytestmark = pytest.mark.integration


@pytest.fixture
def worker(redis_url: str) -> Iterator[None]:
    with worker_process(redis_url):
        yield


@pytest.fixture
def papp(redis_url: str) -> Iterator[JobQ]:
    """The producer's view of the worker's app: the same tasks, on the test server."""
    rt.app.bind(url=redis_url)
    rt.app._known_queues.clear()  # the server is flushed between tests
    yield rt.app
    rt.app.close()


def test_every_async_call_does_what_its_sync_twin_does(papp: JobQ, worker: None) -> None:
    async def main() -> None:
        j1 = await rt.add.aenqueue(2, 3)
        j2 = await papp.aenqueue("rt.aadd", [4, 5])
        j3 = await rt.add.options(priority=5).aenqueue(1, 1)
        many = await papp.aenqueue_many(
            [rt.add.request(i, i) for i in range(50)] + [{"task": "rt.add", "args": [1, 2]}]
        )
        assert await j1.aresult(timeout=20) == 5
        assert await j2.aresult(timeout=20) == 9
        assert await j3.aresult(timeout=20) == 2
        assert await asyncio.gather(*(j.aresult(timeout=20) for j in many)) == [2 * i for i in range(50)] + [
            3
        ]
        assert await j1.astatus() is JobState.DONE
        info = await j1.ainfo()
        assert (info.state, info.args, info.result, info.has_result) == (JobState.DONE, [2, 3], 5, True)
        assert info == j1.info()  # the sync read sees the same
        # Cancel: a delayed job before it runs; a finished one is refused with the sync error.
        later = await rt.add.options(delay=3600).aenqueue(1, 2)
        assert await later.astatus() is JobState.SCHEDULED
        await later.acancel()
        assert await later.astatus() is JobState.CANCELLED
        with pytest.raises(errors.JobFailed) as failed:
            await later.aresult(timeout=5)
        assert failed.value.state == "cancelled"
        with pytest.raises(errors.JobNotCancellable):
            await j1.acancel()
        await papp.aclose()

    asyncio.run(main())


def test_async_calls_share_the_sync_validation_and_errors(papp: JobQ, r: redis.Redis) -> None:
    async def main() -> None:
        with pytest.raises(errors.InvalidPriority):
            await rt.add.options(priority=1000).aenqueue(1, 2)
        with pytest.raises(errors.InvalidArguments):
            await papp.aenqueue("rt.add", [1, 2, 3])
        with pytest.raises(errors.InvalidQueueName):
            await papp.aenqueue("rt.add", [1, 2], queue="bad queue")
        with pytest.raises(errors.InvalidInput, match="job 1"):
            await papp.aenqueue_many([rt.add.request(1, 2), {"task": "rt.add", "args": [1], "colour": "red"}])
        with pytest.raises(errors.InvalidInput):
            await rt.add.aenqueue(1, 2, _colour="red")  # type: ignore[call-arg]
        with pytest.raises(errors.JobNotFound):
            await papp.job("nope", "default").aresult(timeout=1)
        with pytest.raises(errors.JobNotFound):
            await papp.job("nope", "default").acancel()
        assert await papp.job("nope", "default").astatus() is JobState.UNKNOWN
        # No worker: the wait times out with the sync call's error.
        j = await rt.add.aenqueue(1, 2)
        t0 = time.monotonic()
        with pytest.raises(errors.ResultTimeout):
            await j.aresult(timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 3
        with pytest.raises(errors.ResultTimeout):
            j.result(timeout=0.2)
        with pytest.raises(errors.InvalidInput):
            await j.aresult(timeout=1, poll_interval=0)
        await papp.aclose()

    asyncio.run(main())
    # The refused requests stored nothing: only the one job enqueued for the timeout.
    assert sorted(k for k in r.keys("jobq:{default}:job:*")) == [
        f"jobq:{{default}}:job:{_only_job(r)}".encode()
    ]


def _only_job(r: redis.Redis) -> str:
    (key,) = r.keys("jobq:{default}:job:*")
    return key.decode().rsplit(":", 1)[1]


def test_a_failed_job_wakes_its_waiter_with_job_failed(papp: JobQ, worker: None) -> None:
    async def main() -> None:
        j = await rt.fail.aenqueue()
        with pytest.raises(errors.JobFailed) as exc:
            await j.aresult(timeout=20)
        assert exc.value.state == "dead"
        await papp.aclose()

    asyncio.run(main())
    with pytest.raises(errors.JobFailed):
        rt.fail.enqueue().result(timeout=20)


def test_ainfo_reads_what_info_reads_a_long_payload_too(papp: JobQ) -> None:
    job = rt.nap.options(delay=600).enqueue(0.25)
    big = papp.enqueue("rt.add", ["x" * 500, "y" * 300], check_args=True)

    async def main() -> None:
        for j in (job, big):
            assert await j.ainfo() == j.info()
        assert (await big.ainfo()).args == ["x" * 500, "y" * 300]
        await papp.aclose()

    asyncio.run(main())


def test_one_pool_per_event_loop(papp: JobQ) -> None:
    seen: list[Any] = []

    async def main() -> None:
        seen.append(papp.aclient)
        assert papp.aclient is seen[-1]  # the same loop: the same client
        await rt.add.aenqueue(1, 2)
        await papp.aclose()

    asyncio.run(main())
    asyncio.run(main())
    assert seen[0] is not seen[1]


def test_the_result_wakes_on_the_notice_not_the_poll(papp: JobQ, r: redis.Redis, worker: None) -> None:
    """With the fallback poll at 30 s, only the completion notice can deliver a 0.5 s job's result
    in time; and the notice is published only for a job someone waits for."""
    rt.add.enqueue(0, 0).result(timeout=20)  # the worker is up

    async def main() -> float:
        j = await rt.nap.aenqueue(0.5)
        t0 = time.monotonic()
        assert await j.aresult(timeout=20, poll_interval=30) == 0.5
        late = time.monotonic() - t0
        await papp.aclose()
        return late

    late = asyncio.run(main())
    assert late < 5, late
    t0 = time.monotonic()
    assert rt.nap.enqueue(0.5).result(timeout=20, poll_interval=30) == 0.5
    assert time.monotonic() - t0 < 5
    # Jobs nobody waits for publish nothing: a subscriber on the done channel hears no message
    # for a batch run to the end, then one for a job that is waited for.
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(papp.keys.done("default"))
    try:
        batch = papp.enqueue_many([rt.add.request(i, 1) for i in range(20)])
        _wait_done(batch)
        assert listener.get_message(timeout=0.5) is None
        waited = rt.add.enqueue(1, 1)
        assert waited.result(timeout=20) == 2
        msg = listener.get_message(timeout=5)
        # A small result travels inline ("<id> d<msgpack>"); a large one is read from the job.
        assert msg is not None and msg["data"] == waited.id.encode() + b" d\x02"
        big = rt.big.enqueue(5000)
        assert big.result(timeout=20, poll_interval=30) == "x" * 5000
        msg = listener.get_message(timeout=5)
        assert msg is not None and msg["data"] == big.id.encode()
    finally:
        listener.close()


def _wait_done(jobs: list[jobq.Job[Any]]) -> None:
    deadline = time.monotonic() + 20
    while any(j.status() is not JobState.DONE for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_result_is_shown_masked_by_status_and_http(papp: JobQ, redis_url: str, worker: None) -> None:
    import json

    from jobq.cli import main
    from jobq.web import ApiServer
    from tests.harness.cli import cli_runner
    from tests.integration.test_http import Client

    j = rt.secret.enqueue()
    assert j.result(timeout=20) == {"token": "s3cr3t-value", "ok": 1}
    out = cli_runner().invoke(main, ["status", j.id, "--redis-url", redis_url, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["result"] == {"token": "***", "ok": 1}
    text = cli_runner().invoke(main, ["status", j.id, "--redis-url", redis_url])
    assert '"token": "***"' in text.stdout and "s3cr3t" not in text.stdout
    server = ApiServer(JobQ(redis_url), "127.0.0.1", 0).start()
    try:
        status, _, body = Client(server.port).request("GET", f"/jobs/{j.id}")
    finally:
        server.close()
        server.app.close()
    assert status == 200
    assert body["result"] == {"token": "***", "ok": 1} and body["has_result"] is True
    assert "s3cr3t" not in json.dumps(body)


def test_loop_blocking_detector_finds_no_blocking_call(
    redis_url: str, redis_server: Any, chaos_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every async call through a proxy that delays each reply by 60 ms, in asyncio debug mode
    with a 30 ms slow-callback bound: a blocking Redis call would hold the loop for a whole
    delayed round trip and be reported. (The proxy fronts one server: scripts/check's cluster
    leg leaves this test out; tests/redis_setups/test_async_results.py covers the cluster.)"""
    proxy = chaos_proxy(redis_server)
    slow_url = proxy.url(redis_url)
    app = JobQ(slow_url)

    @app.task(name="rt.add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="rt.fail")
    def fail() -> None:
        raise jobq.Fail("no")

    with worker_process(redis_url):
        rt.app.bind(url=redis_url)
        try:
            rt.add.enqueue(0, 0).result(timeout=20)  # the worker is up (outside the measured loop)
        finally:
            rt.app.close()
        proxy.delay(60)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            # The first call on a loop builds its client and pool once (and imports what they
            # need: ~50 ms on Python 3.10 with the oldest dependencies); every call after it
            # is held to 30 ms.
            await add.aenqueue(0, 0)
            loop.slow_callback_duration = 0.03
            j = await add.aenqueue(1, 2)
            jobs = await app.aenqueue_many([add.request(i, 1) for i in range(5)])
            assert await j.aresult(timeout=30) == 3
            assert await asyncio.gather(*(x.aresult(timeout=30) for x in jobs)) == [i + 1 for i in range(5)]
            assert await j.astatus() is JobState.DONE
            assert (await j.ainfo()).result == 3
            later = await add.options(delay=600).aenqueue(1, 1)
            await later.acancel()
            with pytest.raises(errors.JobFailed):
                await (await fail.aenqueue()).aresult(timeout=30)
            await app.aclose()

        with caplog.at_level(logging.WARNING, logger="asyncio"):
            asyncio.run(main(), debug=True)
    app.close()
    slow = [
        rec.getMessage() for rec in caplog.records if rec.name == "asyncio" and "took" in rec.getMessage()
    ]
    assert slow == []


def test_waiting_for_1000_results_does_not_open_1000_connections(
    papp: JobQ, r: redis.Redis, redis_url: str
) -> None:
    """1,000 callers awaiting results at once share the bounded pool and one subscriber. No
    worker runs while the connections are counted (CLIENT LIST would count its pool too, which
    grows on demand); it starts once every caller waits, and each gets its own result."""
    before = len(r.client_list())

    async def main() -> int:
        jobs = await papp.aenqueue_many([rt.add.request(i, 1) for i in range(1000)])
        waits = [asyncio.ensure_future(j.aresult(timeout=120)) for j in jobs]
        listener = papp._aio().listener
        deadline = time.monotonic() + 30
        while listener.waiting < 1000:  # every caller subscribed, marked its job and waits
            assert time.monotonic() < deadline, listener.waiting
            await asyncio.sleep(0.02)
        peak = len(await papp.aclient.client_list())
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, worker_process(redis_url))
            assert await asyncio.gather(*waits) == [i + 1 for i in range(1000)]
        await papp.aclose()
        return peak

    peak = asyncio.run(main())
    # The bounded pool plus one subscriber, whatever the number of waiters.
    assert peak - before <= jobq.app.ASYNC_MAX_CONCURRENT + 2, (before, peak)


def test_the_fastapi_example_of_the_docs(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, thread_workers: list[Any]
) -> None:
    """docs/examples/fastapi_app.py, its lifespan and handlers driven by plain asyncio (FastAPI
    is not a dependency: a stand-in ``fastapi`` module only records the routes)."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    from tests.harness.proxy_fixtures import ThreadWorker

    class FastAPI:
        def __init__(self, lifespan: Any) -> None:
            self.lifespan = lifespan
            self.routes: dict[tuple[str, str], Any] = {}

        def _route(self, method: str, path: str) -> Any:
            def register(fn: Any) -> Any:
                self.routes[(method, path)] = fn
                return fn

            return register

        def post(self, path: str) -> Any:
            return self._route("POST", path)

        def get(self, path: str) -> Any:
            return self._route("GET", path)

    class HTTPException(Exception):
        def __init__(self, status_code: int, detail: str) -> None:
            self.status_code = status_code

    stub = types.ModuleType("fastapi")
    stub.FastAPI = FastAPI  # type: ignore[attr-defined]
    stub.HTTPException = HTTPException  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastapi", stub)
    monkeypatch.setenv("JOBQ_REDIS_URL", redis_url)
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fastapi_app.py"
    spec = importlib.util.spec_from_file_location("fastapi_app", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    thread_workers.append(ThreadWorker(example.jobs, queues=[("emails", 1)]).start())
    routes = example.api.routes

    async def main() -> None:
        async with example.lifespan(example.api):
            queued = await routes[("POST", "/signup")]("a@example.com")
            waited = await routes[("POST", "/signup/wait")]("b@example.com")
            assert waited["result"] == "welcome sent to b@example.com"
            await example.jobs.job(queued["job"], "emails").aresult(timeout=20)
            status = await routes[("GET", "/signup/{job_id}")](queued["job"])
            assert status == {
                "job": queued["job"],
                "state": "done",
                "result": "welcome sent to a@example.com",
            }
            with pytest.raises(HTTPException):
                await routes[("GET", "/signup/{job_id}")]("no-such-job")
        assert len(example.jobs._loops) == 0  # the lifespan closed this loop's connections

    asyncio.run(main())
    example.jobs.close()


def test_a_lost_notice_connection_is_made_again(
    papp: JobQ, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's connection killed by the server while callers wait (fallback poll at 30 s):
    once subscribed again, every waiter reads its job again (a finish whose notice fell in the
    gap is found so), and the next finishes still wake them."""
    from jobq.storage import reads

    reads_done: list[str] = []
    real = reads.wait_mark_and_fields_async

    async def counting(client: Any, keys: Any, queue: str, job_id: str, *args: Any) -> list[Any]:
        reads_done.append(job_id)
        return await real(client, keys, queue, job_id, *args)

    monkeypatch.setattr(reads, "wait_mark_and_fields_async", counting)

    async def main() -> None:
        first = await rt.add.aenqueue(1, 1)
        second = await rt.add.aenqueue(2, 2)
        waits = [asyncio.ensure_future(j.aresult(timeout=25, poll_interval=30)) for j in (first, second)]
        listener = papp._aio().listener
        while listener.waiting < 2:
            await asyncio.sleep(0.01)
        before = len(reads_done)
        assert await papp.aclient.client_kill_filter(_type="pubsub") == 1
        deadline = time.monotonic() + 10
        while len(reads_done) < before + 2:  # both read their job again, without any finish
            assert time.monotonic() < deadline, reads_done
            await asyncio.sleep(0.01)
        assert sorted(reads_done[before:]) == sorted([first.id, second.id])
        assert listener.subscribed(papp.keys.done("default"))
        with worker_process(redis_url):
            t0 = time.monotonic()
            assert await asyncio.gather(*waits) == [2, 4]
            assert time.monotonic() - t0 < 20  # woken by notices, not the 30 s poll
        await papp.aclose()

    asyncio.run(main())
