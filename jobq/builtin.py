"""Built-in tasks usable with no user code: ``webhook`` and ``email``.

INTERFACE CONTRACT: ``register(app)`` registers the built-in tasks on ``app`` under the names
``webhook`` and ``email``. ``jobq worker`` calls it for every app it runs.
"""

from __future__ import annotations

from jobq.app import JobQ


def register(app: JobQ) -> None:
    """Placeholder until the ops work lands: registers nothing yet."""
