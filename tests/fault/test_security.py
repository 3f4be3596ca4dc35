"""Security checks (RELIABILITY.md SEC3, SEC4, SEC5, SEC6).

SEC1 (ACL user) and SEC2 (TLS) are tested with the connection code, not here.
"""

from __future__ import annotations

import ast
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest

import jobq
from jobq import codec
from jobq.errors import DecodeError
from jobq.storage.scripts import lua_dir
from tests.harness.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "jobq"


def _py_files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


# -- SEC3: msgpack only ----------------------------------------------------------------------------
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"}


def test_sec3_no_unsafe_deserializers_imported() -> None:
    found = []
    for path in _py_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                # yaml.load / yaml.unsafe_load (safe_load is fine), pickle.loads via getattr tricks
                base = node.func.value
                if (
                    isinstance(base, ast.Name)
                    and base.id == "yaml"
                    and node.func.attr
                    in {
                        "load",
                        "unsafe_load",
                        "load_all",
                        "full_load",
                    }
                ):
                    found.append(f"{path.name}:{node.lineno} yaml.{node.func.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "__import__" or node.func.id in {"eval", "exec"}:
                    found.append(f"{path.name}:{node.lineno} {node.func.id}()")
            for n in names:
                if n.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{path.name}:{node.lineno} import {n}")
    assert found == []


def test_sec3_decoder_is_strict() -> None:
    """strict_map_key, raw=False and an ext_hook that refuses ext types, as configured."""
    src = (PKG / "codec.py").read_text()
    assert "strict_map_key=True" in src and "raw=False" in src and "ext_hook=" in src
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(msgpack.ExtType(1, b"x")))
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb({1: "int key"}))
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(1) + b"\x00")  # extra data
    with pytest.raises(DecodeError):
        codec.decode(b"\xdd\xff\xff\xff\xff")  # an array claiming 4 G items
    with pytest.raises(DecodeError):
        codec.decode(b"\x91" * 100_000 + b"\xc0")  # nesting far past the stack limit


PLAIN = (type(None), bool, int, float, str, bytes, list, dict)


def _plain(v: object, depth: int = 0) -> bool:
    if isinstance(v, list):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x, depth + 1) for k, x in v.items())
    return isinstance(v, PLAIN)


def _mutants(rng: random.Random) -> bytes:
    """Random bytes, half of them mutations of valid payloads (to get past the first byte)."""
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(0, 48))
    base = bytearray(
        msgpack.packb(
            [[1, "a", b"b", 2.5, None, True, [1, {"k": -3}]], {"x": "y" * rng.randrange(40)}],
            use_bin_type=True,
        )
    )
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        i = rng.randrange(len(base))
        if op == 0:
            base[i] = rng.randrange(256)
        elif op == 1:
            del base[i : i + rng.randrange(1, 5)]
        else:
            base[i:i] = rng.randbytes(rng.randrange(1, 5))
        if not base:
            break
    return bytes(base)


def test_sec3_decode_fuzz_plain_data_or_decode_error(seed: int) -> None:
    """100k random and mutated byte strings: every one decodes to plain data or raises
    jobq.DecodeError, nothing else; p99 ≤ 1 ms."""
    rng = random.Random(seed)
    n = 100_000
    times = []
    outcomes = {"ok": 0, "decode_error": 0}
    for _ in range(n):
        data = _mutants(rng)
        t0 = time.perf_counter()
        try:
            value = codec.decode(data)
        except DecodeError:
            outcomes["decode_error"] += 1
        except Exception as exc:  # pragma: no cover - the failure this test looks for
            pytest.fail(f"codec.decode({data!r}) raised {type(exc).__name__}: {exc} (seed={seed})")
        else:
            outcomes["ok"] += 1
            assert _plain(value), (data, value)
            try:
                codec.decode_payload(data)
            except DecodeError:
                pass
        times.append(time.perf_counter() - t0)
    times.sort()
    p99 = times[int(0.99 * len(times))]
    print(f"SEC3 fuzz: {outcomes}, p99 {p99 * 1e6:.1f} µs")
    assert outcomes["ok"] > 0 and outcomes["decode_error"] > 0
    assert p99 <= 0.001


# -- SEC6: static Lua ------------------------------------------------------------------------------
def test_sec6_lua_scripts_are_static_files() -> None:
    lua_files = sorted(Path(lua_dir()).rglob("*.lua"))
    assert lua_files
    bad = []
    for path in lua_files:
        text = path.read_text()
        for pat in (r"\bloadstring\s*\(", r"(?<![\w.])load\s*\(", r"\bdofile\s*\(", r"\bloadfile\s*\("):
            for m in re.finditer(pat, text):
                bad.append(f"{path.name}:{text[: m.start()].count(chr(10)) + 1} {m.group(0)}")
    assert bad == []
    # Python side: every script body comes from a file through jobq.storage.scripts.source(); nothing
    # builds a script from strings or sends EVAL with an inline body.
    for path in _py_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in {"eval", "eval_ro", "script_load"}:
                    # Allowed: EVAL of a registered Script's own text (the NOSCRIPT fallback).
                    body = node.args[0] if node.args else None
                    if not (isinstance(body, ast.Attribute) and body.attr == "script"):
                        bad.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
                if node.func.attr == "register_script":
                    arg = node.args[0] if node.args else None
                    called = getattr(arg.func, "id", "") if isinstance(arg, ast.Call) else ""
                    ok = called in {"source", "script_text"}
                    if not ok:
                        bad.append(f"{path.name}:{node.lineno} register_script({ast.unparse(arg or node)})")
    assert bad == []


# -- SEC5: loopback binds --------------------------------------------------------------------------
WORKER = [sys.executable, "-m", "jobq", "worker", "-A", "tests.integration.worker_tasks"]


def _listening(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def _worker_env(server_url: str, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["JOBQ_REDIS_URL"] = server_url
    env["JOBQ_TEST_RECORD_DIR"] = str(tmp)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for_line(path: Path, pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        time.sleep(0.05)
    raise TimeoutError(f"{pattern!r} not in {path}:\n{path.read_text(errors='replace')[-3000:]}")


def test_sec5_metrics_binds_loopback_by_default(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*WORKER, "--queues", "proc", "--metrics-port", "0", "--lease", "2s"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_worker_env(redis_url, tmp_path),
            cwd=ROOT,
        )
    try:
        m = _wait_for_line(log, r"metrics on http://([\d.]+):(\d+)/metrics", 20)
        assert m.group(1) == "127.0.0.1"
        port = int(m.group(2))
        socks = _listening(proc.pid)
        assert f"127.0.0.1:{port}" in socks, socks
        assert all(s.startswith("127.0.0.1:") for s in socks), socks
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "jobq_" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_sec5_http_api_binds_loopback_by_default(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobq", "serve", "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_worker_env(redis_url, tmp_path),
            cwd=ROOT,
        )
    try:
        m = _wait_for_line(log, r"HTTP API on http://([\d.]+):(\d+)", 20)
        assert m.group(1) == "127.0.0.1"
        port = int(m.group(2))
        socks = _listening(proc.pid)
        assert socks == [f"127.0.0.1:{port}"], socks
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


# -- SEC4: the canary password ---------------------------------------------------------------------
CANARY = "CANARY-7f3a9c2e51d04b8a"


def test_sec4_canary_password_appears_nowhere(tmp_path: Path) -> None:
    """Redis requires the canary password. A worker runs (URL in the environment), Redis is
    killed under it and restarted (connection errors), the CLI is run with the URL on argv, and
    the library raises connection errors. The canary is in none of: stdout/stderr and logs,
    exception messages and tracebacks, /metrics, /health, the process titles, CLIENT LIST."""
    import traceback

    server = RedisServer(password=CANARY).start()
    url = server.url
    assert CANARY in url
    seen: dict[str, str] = {}
    log = tmp_path / "worker.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*WORKER, "-Q", "proc", "--metrics-port", "0", "--lease", "2s", "--poll-interval", "0.2"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_worker_env(url, tmp_path),
                cwd=ROOT,
            )
        try:
            m = _wait_for_line(log, r"metrics on http://[\d.]+:(\d+)/metrics", 20)
            port = int(m.group(1))
            app = jobq.JobQ(url)
            for i in range(5):
                app.enqueue("tests.integration.worker_tasks.record", [i], queue="proc")
            admin = server.admin_client()
            seen["CLIENT LIST"] = admin.client_list().__repr__()
            seen["ps"] = subprocess.run(
                ["ps", "-o", "args=", "-p", str(proc.pid)], capture_output=True, text=True
            ).stdout
            seen["cmdline"] = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            # Connection errors: Redis dies under the worker and comes back.
            server.kill()
            time.sleep(1.5)
            try:
                app.enqueue("tests.integration.worker_tasks.record", [99], queue="proc")
            except jobq.JobqError as exc:
                seen["exception"] = f"{exc!s} {exc!r} " + "".join(traceback.format_exception(exc))
            else:  # pragma: no cover
                pytest.fail("enqueue succeeded with Redis down")
            server.start()
            time.sleep(1.0)
            for path in ("/metrics", "/health"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                        seen[path] = resp.read().decode(errors="replace")
                except urllib.error.HTTPError as exc:  # /health may say 503 right after
                    seen[path] = exc.read().decode(errors="replace")
            app.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        seen["worker output"] = log.read_text(errors="replace")
        # The worker did meet connection errors (and logged them) while Redis was down.
        assert re.search(r"(?i)unavailable|connection", seen["worker output"]), seen["worker output"]
        # The CLI with the URL on argv: it works, warns once about argv, never echoes it.
        cli = subprocess.run(
            [sys.executable, "-m", "jobq", "--redis-url", url, "worker", "--burst", "--queues", "proc"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=_worker_env(url, tmp_path),
        )
        seen["cli (url on argv)"] = cli.stdout + cli.stderr
        assert cli.returncode == 0, seen["cli (url on argv)"]
        assert "command line" in seen["cli (url on argv)"], "no warning about the password on argv"
        # ... and with an unreachable Redis: connection errors, retried until stopped.
        with (tmp_path / "unreachable.log").open("wb") as out:
            bad = subprocess.Popen(
                [sys.executable, "-m", "jobq", "worker", "--queues", "proc", "--lease", "2s"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=_worker_env(f"redis://:{CANARY}@127.0.0.1:1/0", tmp_path),
            )
        _wait_for_line(tmp_path / "unreachable.log", r"(?i)unavailable|connect", 20)
        time.sleep(1.0)
        bad.send_signal(signal.SIGTERM)
        bad.wait(30)
        seen["worker (unreachable redis)"] = (tmp_path / "unreachable.log").read_text(errors="replace")
        # The HTTP API and the producer/inspection CLI, with the URL in the environment.
        serve_log = tmp_path / "serve.log"
        with serve_log.open("wb") as out:
            api = subprocess.Popen(
                [sys.executable, "-m", "jobq", "serve", "--port", "0"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_worker_env(url, tmp_path),
                cwd=ROOT,
            )
        try:
            m = _wait_for_line(serve_log, r"HTTP API on http://[\d.]+:(\d+)", 20)
            api_port = int(m.group(1))
            body = b'{"task": "tests.integration.worker_tasks.record", "args": [7], "queue": "proc"}'
            req = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/jobs", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                seen["http POST /jobs"] = resp.read().decode()
            for path in ("/health", "/stats", "/metrics", "/jobs?queue=proc"):
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}{path}", timeout=5) as resp:
                    seen[f"http {path}"] = resp.read().decode()
            seen["ps serve"] = subprocess.run(
                ["ps", "-o", "args=", "-p", str(api.pid)], capture_output=True, text=True
            ).stdout
            server.kill()  # connection errors through the API
            for path in ("/health", "/stats", "/jobs?queue=proc"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}{path}", timeout=10) as resp:
                        seen[f"http {path} (redis down)"] = resp.read().decode()
                except urllib.error.HTTPError as exc:
                    seen[f"http {path} (redis down)"] = f"{exc.code} " + exc.read().decode(errors="replace")
            down = subprocess.run(
                [sys.executable, "-m", "jobq", "enqueue", "t", "[1]"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                env=_worker_env(url, tmp_path),
            )
            seen["cli enqueue (redis down)"] = down.stdout + down.stderr
            assert down.returncode != 0
            server.start()
        finally:
            api.send_signal(signal.SIGTERM)
            api.wait(20)
        seen["serve output"] = serve_log.read_text(errors="replace")
        for cmd in (["enqueue", "t", "[1]", "-q", "proc"], ["stats"], ["nodes"], ["jobs", "--help"]):
            res = subprocess.run(
                [sys.executable, "-m", "jobq", *cmd],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                env=_worker_env(url, tmp_path),
            )
            seen[f"cli {' '.join(cmd)}"] = res.stdout + res.stderr
            assert res.returncode == 0, (cmd, res.stdout, res.stderr)
        seen["CLIENT LIST (end)"] = repr(server.admin_client().client_list())
        seen["redis log"] = (server.dir / "redis.log").read_text(errors="replace")
    finally:
        server.cleanup()
    leaks = [where for where, text in seen.items() if CANARY in text]
    assert leaks == [], {k: seen[k][-2000:] for k in leaks}
    assert "Redis unavailable" in seen["exception"] or "unavailable" in seen["exception"].lower()
    assert seen["/metrics"].count("jobq_") > 0
