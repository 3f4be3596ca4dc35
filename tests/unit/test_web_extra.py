"""The core install stays lean: the worker, the producer API and the CLI import without the
``jobq[web]`` extra, and ``jobq serve`` without it says which extra to install."""

from __future__ import annotations

import subprocess
import sys

# Make the web stack unimportable, as on an install without the extra.
BLOCK = """
import sys
for name in ("uvicorn", "httptools", "uvloop"):
    sys.modules[name] = None
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=60)


def test_core_imports_without_the_web_extra() -> None:
    res = _run(
        "import jobq, jobq.worker, jobq.cli, jobq.metrics, jobq.admin\n"
        "bad = [m for m in ('uvicorn', 'httptools') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "print('ok')"
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_serve_without_the_web_extra_names_it() -> None:
    res = _run("from jobq.cli import main\nmain(['serve', '--port', '0'])")
    assert res.returncode != 0
    assert "jobq[web]" in res.stderr, res.stderr


def test_the_worker_runs_asyncio_without_uvloop() -> None:
    # uvloop comes with jobq[web]: without it the node runs asyncio's (precise) loop, and
    # insisting on uvloop is a usage error that says why.
    res = _run(
        "from jobq.worker import loop\n"
        "async def kind():\n"
        "    return loop.running_loop_kind()\n"
        "print(loop.loop_kind(), loop.run(kind()))"
    )
    assert res.returncode == 0 and res.stdout.split() == ["asyncio", "asyncio"], res.stderr
    res = _run("from jobq.cli import main\nmain(['worker', '--loop', 'uvloop'])")
    assert res.returncode == 2, res.stderr
    assert "--loop" in res.stderr and "uvloop does not import" in res.stderr, res.stderr
