"""``jobq worker``: run a worker node (see :mod:`jobq.worker`)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
