"""TLS (``rediss://`` with CA, certificate and key) against a redis-server started with TLS on
loopback, and the documented minimal ACL for a jobq user: a producer and a worker run with only
those rights; missing rights and wrong passwords give clear jobq errors without the password."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobq
from jobq import JobQ, JobState
from jobq.storage import clients
from tests.harness.redis_server import RedisServer, free_port
from tests.harness.tls import TlsFiles, make_tls_files, tls_server_args
from tests.redis_setups.conftest import burst

pytestmark = pytest.mark.integration

#: The minimal ACL of a jobq producer + worker user (docs/redis.md, "A least-privilege ACL user";
#: tests/unit/test_docs.py keeps the two equal): its keys and channels, the script commands, the
#: commands the scripts run, and the few plain commands of the producer, heartbeat, scheduler and
#: pub/sub listener.
JOBQ_ACL_COMMANDS = (
    # running scripts (EVALSHA; SCRIPT LOAD after NOSCRIPT)
    "+evalsha +script|load "
    # inside the scripts
    "+time +get +set +del +exists +type +incr +incrby +pexpire +pttl "
    "+hget +hset +hdel +hincrby +rpush +lrange +lrem +llen "
    "+zadd +zrem +zcard +zscore +zrange +zrangebyscore +zpopmin +spublish +publish +xadd "
    # producer, heartbeat, scheduler, wake-ups (subscribe: the classic channel of earlier versions)
    "+sadd +smembers +hmget +zremrangebyscore +ssubscribe +subscribe +ping"
)
JOBQ_ACL = f"user jobq on >s3cret-pw resetkeys ~jobq:* resetchannels &jobq:* -@all {JOBQ_ACL_COMMANDS}"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[tuple[RedisServer, int]]:
    port = free_port()
    server = RedisServer(extra=tls_server_args(tls_files, port)).start()
    yield server, port
    server.cleanup()


def tls_url(port: int, files: TlsFiles, ca: Path | None = None) -> str:
    return (
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca or files.ca}"
        f"&ssl_certfile={files.client_cert}&ssl_keyfile={files.client_key}"
    )


def run_producer_and_worker(app: JobQ) -> None:
    """Everything a producer and a worker node do: enqueue (single, batch, delayed, unique),
    read status and results, and a burst worker with heartbeat, scheduler, reaper and pub/sub
    that runs, retries and dead-letters jobs."""

    @app.task(name="double")
    def double(x: int) -> int:
        return 2 * x

    @app.task(name="flaky", max_attempts=2, retry_backoff=0)
    def flaky() -> None:
        raise RuntimeError("always")

    jobs = [double.enqueue(i) for i in range(5)]
    jobs += app.enqueue_many([{"task": "double", "args": [i]} for i in range(5, 10)])
    jobs.append(double.enqueue(10, _delay=0.05, _unique_key="u1"))
    bad = flaky.enqueue()
    time.sleep(0.06)
    burst(app, concurrency=4, lease=5)
    for _ in range(100):  # the retry backoff may outlast one burst run
        if bad.status() is JobState.DEAD:
            break
        burst(app, concurrency=4, lease=5)
    assert [j.result(timeout=5) for j in jobs] == [2 * i for i in range(11)]
    assert bad.status() is JobState.DEAD and "always" in (bad.info().error or "")
    assert app.job(jobs[0].id).info().state is JobState.DONE


# -- TLS ----------------------------------------------------------------------------------------
def test_rediss_url_with_ca_certificate_and_key(
    tls_server: tuple[RedisServer, int], tls_files: TlsFiles
) -> None:
    server, port = tls_server
    server.admin_client().flushall()
    app = JobQ(tls_url(port, tls_files))
    try:
        run_producer_and_worker(app)
    finally:
        app.close()


def test_tls_paths_from_environment(
    tls_server: tuple[RedisServer, int], tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = tls_server
    monkeypatch.setenv("JOBQ_REDIS_SSL_CA_CERTS", str(tls_files.ca))
    monkeypatch.setenv("JOBQ_REDIS_SSL_CERTFILE", str(tls_files.client_cert))
    monkeypatch.setenv("JOBQ_REDIS_SSL_KEYFILE", str(tls_files.client_key))
    c = clients.sync_client(f"rediss://127.0.0.1:{port}/0")
    try:
        assert c.ping()
    finally:
        c.close()


def test_untrusted_server_certificate_is_refused_clearly(
    tls_server: tuple[RedisServer, int], tls_files: TlsFiles, tmp_path: Path
) -> None:
    _, port = tls_server
    other = make_tls_files(tmp_path / "other")
    app = JobQ(tls_url(port, tls_files, ca=other.ca))
    try:
        t0 = time.monotonic()
        with pytest.raises(jobq.RedisUnavailable, match="certificate verify failed"):
            app.enqueue("double", [1])
        assert time.monotonic() - t0 < 5
    finally:
        app.close()


def test_a_plain_client_on_the_tls_port_fails_clearly(tls_server: tuple[RedisServer, int]) -> None:
    _, port = tls_server
    app = JobQ(f"redis://127.0.0.1:{port}/0?socket_timeout=1")
    try:
        with pytest.raises(jobq.RedisUnavailable):
            app.enqueue("double", [1])
    finally:
        app.close()


# -- ACL ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    server = RedisServer(
        acl_lines=[
            "user default on nopass ~* &* +@all",
            JOBQ_ACL,
            # everything but running scripts
            f"user noscript on >pw2 ~jobq:* &jobq:* -@all {JOBQ_ACL_COMMANDS} -evalsha",
            # runs scripts, but a command inside them is not granted
            f"user notime on >pw3 ~jobq:* &jobq:* -@all {JOBQ_ACL_COMMANDS} -time",
            # the right commands on the wrong keys
            f"user otherkeys on >pw4 ~other:* &jobq:* -@all {JOBQ_ACL_COMMANDS}",
        ]
    ).start()
    yield server
    server.cleanup()


def test_producer_and_worker_run_with_only_the_documented_acl(acl_server: RedisServer) -> None:
    acl_server.admin_client().flushall()
    app = JobQ(acl_server.url_for("jobq", "s3cret-pw"))
    try:
        run_producer_and_worker(app)
    finally:
        app.close()
    log = acl_server.admin_client().acl_log()
    refused = {e["object"] for e in log if e.get("username") == "jobq"}
    # Only the optional eviction-policy check (docs/redis.md: add +info to enable it) was refused.
    assert refused <= {"info", "config|get"}, refused


@pytest.mark.parametrize(
    ("user", "password", "missing"),
    [("noscript", "pw2", "evalsha"), ("notime", "pw3", "time"), ("otherkeys", "pw4", "key")],
)
def test_a_user_without_the_rights_gets_a_clear_auth_error(
    acl_server: RedisServer, user: str, password: str, missing: str
) -> None:
    app = JobQ(acl_server.url_for(user, password))
    try:
        with pytest.raises(jobq.RedisAuthError) as e:
            app.run(app.store.enqueue("q", [app.prepare(jobq.EnqueueRequest("t"))[1]]))
    finally:
        app.close()
    msg = str(e.value)
    assert "permission" in msg and missing in msg.lower() and password not in msg


def test_wrong_password_fails_fast_without_the_password(acl_server: RedisServer) -> None:
    app = JobQ(acl_server.url_for("jobq", "not-the-password"))
    try:
        t0 = time.monotonic()
        with pytest.raises(jobq.RedisAuthError) as e:
            app.enqueue("t")
        assert time.monotonic() - t0 < 2
    finally:
        app.close()
    assert "not-the-password" not in str(e.value) and "not-the-password" not in repr(e.value)
