"""The package's shape, enforced: imports point down, the command line has no circle, and every
module has a place in the map (docs/layout.md).

Rules are stated per module prefix, so a module keeps its layer when a flat module becomes a
package (``jobq.worker`` covers ``jobq/worker/node.py`` and a future ``jobq/worker/fetcher.py``;
``jobq.storage`` is the storage package to come). Imports are read from the source with
:mod:`ast` (nothing is imported): every ``import`` counts, inside functions and under
``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "jobq"

#: Layers from the bottom up, each a list of module prefixes; MAY_IMPORT says which layers a
#: module of each may import (DESIGN §6: storage uses nothing of jobq above it, the worker uses
#: storage and never a front, the fronts use the API, the worker and storage).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Pure helpers: no Redis, no jobq imports outside this layer.
    (
        "base",
        (
            "jobq.errors",
            "jobq.clock",
            "jobq.util",
            "jobq.strict_json",
            "jobq.backoff",
            "jobq._fault_injection",
            "jobq.current",
            "jobq.tracing",
        ),
    ),
    # Everything that speaks to Redis: key names, script calls, clients and URLs, server checks,
    # loading the Lua files; and payload encoding.
    (
        "storage",
        ("jobq.storage", "jobq.codec"),
    ),
    # The public API: the app, tasks, requests, inspection, built-in tasks, metrics, logs.
    (
        "api",
        (
            "jobq",
            "jobq.app",
            "jobq.requests",
            "jobq.cron",
            "jobq.admin",
            "jobq.events",
            "jobq.builtin",
            "jobq.metrics",
            "jobq.logs",
        ),
    ),
    # The worker's components that need only keys, script calls and a clock (a narrow context,
    # jobq/worker/context.py), never the app: lease renewals, the reaper, the slot backoff, the
    # event loop, the held-jobs table, the wake-ups.
    (
        "worker parts",
        (
            "jobq.worker.context",
            "jobq.worker.heartbeat",
            "jobq.worker.reaper",
            "jobq.worker.slots",
            "jobq.worker.loop",
            "jobq.worker.held",
            "jobq.worker.wakeups",
        ),
    ),
    # The worker node (it runs the app's tasks, so it holds the app), the components that run
    # them or record their outcomes (fetcher, executor, acker, outcomes), and the scheduler (it
    # enqueues cron jobs through the app).
    ("worker", ("jobq.worker",)),
    # The fronts: the command line and the HTTP API (and a future web/ dashboard).
    ("front", ("jobq.cli", "jobq.http", "jobq.web", "jobq.__main__")),
]

MAY_IMPORT: dict[str, set[str]] = {
    "base": {"base"},
    "storage": {"storage", "base"},
    "api": {"api", "storage", "base"},
    "worker parts": {"worker parts", "storage", "base"},
    "worker": {"worker", "worker parts", "api", "storage", "base"},
    "front": {"front", "worker", "worker parts", "api", "storage", "base"},
}

#: Fronts only the given modules may import (a front is an entry point, not a library).
FRONT_USERS: dict[str, tuple[str, ...]] = {
    "jobq.cli": ("jobq.cli", "jobq.__main__"),
    "jobq.http": ("jobq.cli", "jobq.web"),
    "jobq.web": ("jobq.cli", "jobq.web"),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest prefix that covers ``module`` (None: unplaced). The
    package itself, ``jobq``, covers only its ``__init__``."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            covers = module == p if p == "jobq" else _under(module, p)
            if covers and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The jobq modules ``module`` imports (``from jobq.x import y`` counts as ``jobq.x.y`` when
    that is a module, else as ``jobq.x``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*head, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if _under(m, "jobq") and m != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


EDGES = graph()


def test_the_rules_read_the_imports() -> None:
    assert "jobq.storage.calls" in EDGES["jobq.app"]
    assert "jobq.cli.common" in EDGES["jobq.cli.worker"]
    assert "jobq.worker" in EDGES["jobq.cli.worker"]  # an import inside a function counts too


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in EDGES if layer_of(m) is None)
    assert not unplaced, f"add these to LAYERS here and to docs/layout.md: {unplaced}"


@pytest.mark.parametrize("module", sorted(EDGES))
def test_imports_point_down(module: str) -> None:
    mine = layer_of(module)
    if mine is None:
        pytest.skip("unplaced (test_every_module_has_a_layer fails)")
    allowed = MAY_IMPORT[LAYERS[mine][0]]
    up = sorted(
        f"{target} ({LAYERS[t][0]})"
        for target in EDGES[module]
        if (t := layer_of(target)) is not None and LAYERS[t][0] not in allowed
    )
    assert not up, f"{module} ({LAYERS[mine][0]}) imports a layer it may not: {up}"


def test_every_layer_has_its_rules() -> None:
    assert set(MAY_IMPORT) == {name for name, _ in LAYERS}
    assert all(name in allowed for name, allowed in MAY_IMPORT.items())


def test_storage_never_imports_the_worker_the_api_or_a_front() -> None:
    low = {"base", "storage"}
    name = {m: LAYERS[i][0] for m in EDGES if (i := layer_of(m)) is not None}
    bad = {m: sorted(t for t in EDGES[m] if name.get(t) not in low) for m in EDGES if name.get(m) in low}
    assert not {m: t for m, t in bad.items() if t}


def test_the_worker_never_imports_a_front_and_its_parts_never_the_app() -> None:
    worker = [m for m in EDGES if _under(m, "jobq.worker")]
    assert not [(m, t) for m in worker for t in EDGES[m] if _under(t, "jobq.cli") or _under(t, "jobq.http")]
    parts = [m for m in worker if LAYERS[layer_of(m) or 0][0] == "worker parts"]
    assert len(parts) == 7
    assert not [(m, t) for m in parts for t in EDGES[m] if _under(t, "jobq.app") or t == "jobq"]


#: The node's components, one file each; only ``jobq.worker.node`` wires them to each other.
COMPONENTS = {f"jobq.worker.{c}" for c in ("fetcher", "executor", "acker", "wakeups")}


def test_the_held_jobs_table_is_at_the_bottom_of_the_worker() -> None:
    """held.py imports no other worker module: what happens when room frees is a callback."""
    assert not [t for t in EDGES["jobq.worker.held"] if _under(t, "jobq.worker")]


def test_only_the_node_wires_components() -> None:
    assert COMPONENTS <= set(EDGES)
    wiring = {
        m: sorted(EDGES[m] & COMPONENTS)
        for m in EDGES
        if _under(m, "jobq") and m != "jobq.worker.node" and EDGES[m] & COMPONENTS
    }
    assert not wiring, f"only jobq.worker.node may import a component: {wiring}"
    assert COMPONENTS <= EDGES["jobq.worker.node"]


def test_no_worker_class_is_over_400_lines() -> None:
    long = {
        f"{path.name}:{node.name}": (node.end_lineno or 0) - node.lineno + 1
        for path in (PACKAGE / "worker").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and (node.end_lineno or 0) - node.lineno + 1 > 420
    }
    assert not long


def test_only_storage_imports_the_redis_client() -> None:
    """Commands, subscriptions, exception and retry types: all through jobq/storage/ (the one
    exception is the command line's connection check, jobq/cli/common.py)."""
    users = sorted(
        m
        for m, path in modules().items()
        if not _under(m, "jobq.storage")
        and m != "jobq.cli.common"
        and any(
            (isinstance(n, ast.Import) and any(_under(a.name, "redis") for a in n.names))
            or (isinstance(n, ast.ImportFrom) and _under(n.module or "", "redis") and not n.level)
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    )
    assert not users


def test_fronts_are_imported_only_by_their_users() -> None:
    bad = [
        f"{m} -> {t}"
        for m, targets in EDGES.items()
        for t in targets
        for front, users in FRONT_USERS.items()
        if _under(t, front) and not any(_under(m, u) for u in users)
    ]
    assert not bad


def test_the_command_line_has_no_circle() -> None:
    cli = {m: {t for t in ts if _under(t, "jobq.cli")} for m, ts in EDGES.items() if _under(m, "jobq.cli")}
    assert len(cli) > 5
    assert not circles(cli)
    # The command modules import what they share (common, apps, output), never the group itself
    # or another command.
    assert not [m for m, ts in cli.items() if "jobq.cli" in ts]
    shared = {"jobq.cli", "jobq.cli.common", "jobq.cli.apps", "jobq.cli.output"}
    commands = set(cli) - shared
    assert not {m: ts & commands for m, ts in cli.items() if m != "jobq.cli" and ts & commands}


def test_no_circle_anywhere() -> None:
    assert not circles(EDGES)


def test_a_new_module_must_be_placed() -> None:
    assert layer_of("jobq") is not None and layer_of("jobq.somethingnew") is None
    assert LAYERS[layer_of("jobq.worker.fetcher") or 0][0] == "worker"
    assert LAYERS[layer_of("jobq.worker.reaper") or 0][0] == "worker parts"
    assert LAYERS[layer_of("jobq.storage.calls") or 0][0] == "storage"


def test_circles_are_found() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
