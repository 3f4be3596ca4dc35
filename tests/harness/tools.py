"""External tools some tests need (promtool): scripts/check installs them, so under CI (``$CI``
set, as .ci/run does) a missing one fails the test instead of skipping it; a skipped check is a
check that does not run. Elsewhere (a developer's machine without the tool) the test skips."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str, what: str) -> str:
    """The path of ``name``; if missing, skip (fail under $CI) saying what goes unchecked."""
    path = shutil.which(name)
    if path is not None:
        return path
    why = f"{name} not installed (Debian package {package!r}); {what}"
    if os.environ.get("CI"):
        pytest.fail(f"{why}: scripts/check installs it, so under CI it must be there")
    pytest.skip(why)
