"""ci/constraints-min.txt pins every requirement that pyproject.toml declares (dependencies and
the web, test, dev and docs extras) at exactly its declared minimum, so the oldest leg of
scripts/check-deps tests the floors that pip would accept for a user."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def declared() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in ("web", "otel", "test", "dev", "docs"):
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def pinned() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "ci" / "constraints-min.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = spec.version
    return pins


def test_every_requirement_has_a_floor_and_the_constraints_pin_it() -> None:
    pins = pinned()
    seen: set[str] = set()
    for req in declared():
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"{req}: declare one lower bound (>=)"
        name = req.name.lower()
        seen.add(name)
        pin = pins.get(name)
        assert pin is not None and Version(pin) == floors[0], f"{req}: constraints pin {name}=={pin}"
    assert set(pins) == seen, f"pinned but not declared: {set(pins) - seen}"
