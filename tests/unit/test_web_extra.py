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
