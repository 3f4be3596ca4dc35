"""The package and its command line import, and every Lua script is registered."""

from __future__ import annotations

import jobq
from jobq.cli import main
from jobq.scripts import ScriptName, lua_dir
from tests.harness.cli import cli_runner


def test_every_lua_file_has_a_script_name() -> None:
    files = {p.stem for p in lua_dir().glob("*.lua")}
    assert files == {n.value for n in ScriptName}


def test_cli_help_lists_commands() -> None:
    result = cli_runner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "jobq" in result.output
    assert jobq.__version__
