"""The package and its command line import, and every Lua script is registered."""

from __future__ import annotations

import jobq
from jobq.cli import main
from jobq.storage.scripts import ScriptName, lua_dir
from tests.harness.cli import cli_runner


def test_every_lua_file_has_a_script_name() -> None:
    files = {p.stem for p in lua_dir().glob("*.lua")}
    assert files == {n.value for n in ScriptName}


def test_cli_help_lists_commands() -> None:
    result = cli_runner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "jobq" in result.output
    assert jobq.__version__


def test_version_has_one_source() -> None:
    """``jobq --version`` and ``jobq.__version__`` both read the installed metadata, which
    comes from pyproject.toml: the three agree."""
    import re
    from importlib.metadata import version
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    found = re.search(r'(?m)^version = "([^"]+)"$', text)
    assert found is not None
    declared = found.group(1)
    assert jobq.__version__ == version("jobq") == declared
    result = cli_runner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"jobq, version {declared}"
