"""Build the wheel, install it into a fresh virtualenv, and run an enqueue and a claim against a
real redis-server from there: a Lua script (or the shared prelude) missing from the wheel can
never ship. The venv sees the system's site-packages for the dependencies (no download), so the
test checks that the installed jobq, not the source tree, is what runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from jobq.scripts import PRELUDE, ScriptName
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jobq
    from jobq.scripts import lua_dir

    app = jobq.JobQ(sys.argv[1], prefix="wheeltest")
    job = app.enqueue("pkg.task", [1, "two"], {"k": 3}, queue="wheel", priority=5)
    res = app.run(app.store.claim("wheel", "node-w", 10, 30_000))
    codes = app.run(app.store.ack("wheel", "node-w", [(job.id, b"")]))
    print(json.dumps({
        "file": jobq.__file__,
        "lua_dir": str(lua_dir()),
        "job": job.id,
        "claimed": [j.id for j in res.jobs],
        "task": res.jobs[0].task,
        "acked": codes,
        "status": job.status().value,
    }))
    """
)


def build_wheel(out: Path) -> Path:
    """``python -m build --wheel`` without isolation when hatchling is installed (no download),
    else with an isolated build environment."""
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-isolation")
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    (wheel,) = out.glob("jobq-*.whl")
    return wheel


def test_wheel_ships_every_script_and_runs_from_a_fresh_venv(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    wheel = build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    for n in ScriptName:
        assert f"jobq/lua/{n.value}.lua" in names
    assert f"jobq/lua/{PRELUDE.as_posix()}" in names
    assert "jobq/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    work = tmp_path / "elsewhere"  # not the source tree, so `import jobq` cannot find it by cwd
    work.mkdir()
    c = redis_server.admin_client()
    c.flushall()
    c.close()
    out = subprocess.run(
        [str(py), "-I", "-c", PROGRAM, redis_server.url],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    site = env_dir.resolve()
    assert Path(got["file"]).resolve().is_relative_to(site), got["file"]
    assert Path(got["lua_dir"]).resolve().is_relative_to(site), got["lua_dir"]
    assert got["claimed"] == [got["job"]]
    assert got["task"] == "pkg.task"
    assert got["acked"] == [1]
    assert got["status"] == "done"
    # The console script is installed too.
    cli = subprocess.run(
        [str(env_dir / "bin" / "jobq"), "--help"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0, cli.stderr
