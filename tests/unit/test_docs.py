"""The documentation agrees with the code: one version, every cited fault-test id in the plan,
every metric documented, the README short and its links alive, the HTTP reference renderable.

``mkdocs build --strict`` (scripts/check) checks the site's own links and anchors; these tests
check what a build cannot see."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import jobq

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
#: How the code and tests cite the fault-test plan (docs/test-plan.md, once RELIABILITY.md).
PLAN_ID = re.compile(r"\b(F\d{1,2}b?|S[1-5]|B[1-6]|SEC[1-6])\b")


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("jobq_docs_hook", DOCS / "hooks" / "jobq_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_version_everywhere() -> None:
    version = _hook().project_version()  # pyproject.toml, the one source
    assert jobq.__version__ == version
    assert json.loads((ROOT / "jobq" / "openapi.json").read_text())["info"]["version"] == version
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()


def test_every_fault_test_id_cited_in_the_code_is_in_the_plan() -> None:
    plan = (DOCS / "test-plan.md").read_text()
    anchors = set(re.findall(r'<a id="([a-z0-9]+)"></a>', plan))
    cited: set[str] = set()
    for folder in ("jobq", "tests", "scripts", "lua"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".lua"):
                text = path.read_text(errors="replace")
                for line in text.splitlines():
                    if "RELIABILITY" in line or re.search(r"\b(F\d{1,2}b?|SEC\d)\b", line):
                        cited.update(PLAN_ID.findall(line))
    assert cited, "no citation found: the pattern is wrong"
    missing = sorted(i for i in cited if i.lower() not in anchors)
    assert not missing, f"cited but not in docs/test-plan.md: {missing}"


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    code = (ROOT / "jobq" / "metrics.py").read_text()
    names = set(re.findall(r'"(jobq_[a-z_]+)"', code))
    counters = set(re.findall(r'Counter\(\s*"(jobq_[a-z_]+)"', code))
    exposed = {n + "_total" if n in counters else n for n in names}
    page = (DOCS / "metrics.md").read_text()
    documented = set(re.findall(r"`(jobq_[a-z_]+)`", page))
    assert exposed - documented == set(), "metrics missing from docs/metrics.md"
    assert documented - exposed == set(), "docs/metrics.md names metrics the code does not have"


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_http_reference_renders_every_route_and_schema() -> None:
    doc = json.loads((ROOT / "jobq" / "openapi.json").read_text())
    text = _hook().render_openapi(doc)
    for path, ops in doc["paths"].items():
        for method in ops:
            assert f"`{method.upper()} {path}`" in text
    for name in doc["components"]["schemas"]:
        assert f"### {name} " in text


def test_the_documented_acl_is_the_tested_one() -> None:
    page = (DOCS / "redis.md").read_text()
    block = page.split("ACL SETUSER jobq", 1)[1].split("```", 1)[0]
    documented = set(re.findall(r"\+[a-z|]+", block))
    test = (ROOT / "tests" / "redis_setups" / "test_tls_acl.py").read_text()
    tested = set(re.findall(r"\+[a-z|]+", test.split("JOBQ_ACL_COMMANDS = (", 1)[1].split("\n)", 1)[0]))
    assert documented == tested
