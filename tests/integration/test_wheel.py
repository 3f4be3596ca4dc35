"""Build the wheel and the sdist, install each with its dependencies resolved into a brand-new
virtualenv (no system site-packages, nothing from the source tree), and run an enqueue and a claim
against a real redis-server from there: a Lua script (or the shared prelude) missing from a
distribution, or a dependency missing from its metadata, can never ship.

The dependencies come from PyPI once per run, into a wheelhouse that both installs then resolve
from offline (``--no-index --find-links``); pip's own cache makes later runs quick."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import pytest

from jobq.storage.scripts import PRELUDE, ScriptName
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import click, hiredis, msgpack, prometheus_client, redis
    import jobq
    from jobq.storage.scripts import lua_dir

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
        **{m.__name__: m.__file__ for m in (redis, msgpack, click, prometheus_client, hiredis)},
    }))
    """
)


def pip(py: Path | str, *args: str, timeout: float = 600) -> None:
    res = subprocess.run(
        [str(py), "-m", "pip", *args, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, f"pip {' '.join(args)}:\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``python -m build --sdist --wheel``, without isolation when hatchling is installed (no
    download), else with an isolated build environment."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-isolation")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("jobq-*.whl")
    (sdist,) = out.glob("jobq-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, dists: dict[str, Path]) -> Path:
    """jobq's dependencies as its wheel's metadata declares them, and the build backend the sdist
    needs, resolved from PyPI (the one step that uses the network)."""
    wh = tmp_path_factory.mktemp("wheelhouse")
    with open(ROOT / "pyproject.toml", "rb") as f:
        backend = tomllib.load(f)["build-system"]["requires"]
    pip(sys.executable, "download", "-q", "-d", str(wh), str(dists["wheel"]), *backend)
    return wh


def test_the_wheel_ships_every_script(dists: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    for n in ScriptName:
        assert f"jobq/lua/{n.value}.lua" in names
    assert f"jobq/lua/{PRELUDE.as_posix()}" in names
    assert "jobq/py.typed" in names


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_with_its_dependencies_into_a_new_venv_and_runs(
    kind: str, dists: dict[str, Path], wheelhouse: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # Only the wheelhouse: a dependency missing from the metadata is missing here too. For the
    # sdist, pip builds the wheel itself (in an isolated build environment, from the wheelhouse).
    pip(py, "install", "-q", "--no-index", "--find-links", str(wheelhouse), str(dists[kind]))
    work = tmp_path / "elsewhere"  # not the source tree, so `import jobq` cannot find it by cwd
    work.mkdir()
    c = redis_server.admin_client()
    c.flushall()
    c.close()
    out = subprocess.run(
        [str(py), "-I", "-c", PROGRAM, redis_server.url],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    site = env_dir.resolve()
    for mod in ("file", "lua_dir", "redis", "msgpack", "click", "prometheus_client", "hiredis"):
        assert Path(got[mod]).resolve().is_relative_to(site), (mod, got[mod])
    assert got["claimed"] == [got["job"]]
    assert got["task"] == "pkg.task"
    assert got["acked"] == [1]
    assert got["status"] == "done"
    # The console script is installed too.
    cli = subprocess.run(
        [str(env_dir / "bin" / "jobq"), "--help"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0, cli.stderr
