"""A click test runner with click 8.2's result on every supported click: ``stdout`` and
``stderr`` apart, and ``output`` with both. click 8.2 and newer do that themselves (and have no
``mix_stderr``); on 8.1 the runner keeps stderr apart and ``output`` is stdout followed by stderr."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner, Result


class _Result81(Result):
    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class _Runner81(CliRunner):
    def invoke(self, *args: Any, **kwargs: Any) -> Result:
        result = super().invoke(*args, **kwargs)
        result.__class__ = _Result81
        return result


def cli_runner() -> CliRunner:
    try:
        return _Runner81(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner()
