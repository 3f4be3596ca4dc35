"""Logging setup for jobq's processes.

INTERFACE CONTRACT: ``configure(fmt="text"|"json", level="INFO")`` sets up the root handler once.
The ops work adds the JSON formatter and secret redaction.
"""

from __future__ import annotations

import logging


def configure(fmt: str = "text", level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
