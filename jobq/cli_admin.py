"""Producer and admin commands: ``jobq enqueue``, ``stats``, ``status``, ``jobs``, ``dead``,
``cancel``, ``queue``, ``nodes``, ``serve``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
