"""The house's shape as imports: the library never reaches up into the actors or the jobs, and no two
modules import each other, directly or around a circle (imports inside functions count: a lazy import
hides a circle from Python, not from the reader)."""

from __future__ import annotations

import ast
import functools
import pickle
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "actors", "jobs")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def syntax_trees(paths: list[Path]) -> list[ast.Module]:
    """`ast.parse` of each file, run in a fresh interpreter and sent back pickled. CPython 3.11 keeps
    `ast.parse`'s recursion count per interpreter, not per thread, and a parse in another thread of
    the test session at the same moment (3.11's tracebacks parse their lines to place the carets)
    fails it with "SystemError: AST constructor recursion depth mismatch" (seen once in a full run)."""
    code = "import ast, pickle, sys; sys.stdout.buffer.write(pickle.dumps([ast.parse(open(p).read()) for p in sys.argv[1:]]))"
    return pickle.loads(subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, check=True).stdout)


def imports_of(tree: ast.Module, known: dict[str, Path]) -> set[str]:
    """The project modules a file's `tree` imports anywhere in it; `from pipeline import data` names
    pipeline.data when that is a module, else the package."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(tree, known) - {name} for name, tree in zip(known, syntax_trees(list(known.values())))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_finds_circles_and_lazy_imports(tmp_path):
    """The checker itself, on a made-up graph and file: a circle of three, and an import in a function."""
    graph = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.c"}, "pipeline.c": {"pipeline.a"},
             "pipeline.d": set(), "actors.x": {"pipeline.d"}}
    assert cycles(graph) == [["pipeline.a", "pipeline.b", "pipeline.c"]]
    assert cycles({**graph, "pipeline.c": set()}) == []
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from actors.roles import actor_roles\n    from pipeline import data\n")
    assert imports_of(syntax_trees([lazy])[0], project_modules()) == {"actors.roles", "pipeline.data"}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_library_imports_neither_actors_nor_jobs():
    """The roles are assembled in actors/roles.py (docs/architecture.md, section 2): pipeline/ sees them
    only through pipeline.distill's Protocols."""
    upward = {m: sorted(i for i in imports if i.split(".")[0] in ("actors", "jobs"))
              for m, imports in import_graph().items() if m.split(".")[0] == "pipeline"}
    assert {m: i for m, i in upward.items() if i} == {}


def test_actors_import_no_jobs():
    assert {m: i for m, i in import_graph().items() if m.startswith("actors") and any(x.startswith("jobs") for x in i)} == {}


def test_jobs_import_only_pipeline_and_actors():
    """What two jobs share lives in pipeline/: a job imports no other job (jobs.cli, the entry helper,
    aside). The quickstart runs the other jobs, so it may import job modules (`from jobs import x`) to
    call their entry points, but nothing from inside them."""
    jobs = sorted(Path(REPO, "jobs").glob("*.py"))
    for job, tree in zip(jobs, syntax_trees(jobs)):
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                   and not (job.name == "quickstart.py" and n.module == "jobs")]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert [m for m in modules if m.split(".")[0] == "jobs" and m != "jobs.cli"] == [], job.name


def test_every_shipped_asset_is_in_the_package_data():
    """A non-editable install (`pip install .`, a cluster image) carries only what package-data names:
    the planner's measured activation bytes were left out once, and `jobs/plan.py` would have failed
    there. The patterns, expanded as setuptools does, cover every file under pipeline/assets."""
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline"]
    shipped = {p for pattern in patterns for p in (REPO / "pipeline").glob(pattern) if p.is_file()}
    assets = {p for p in (REPO / "pipeline" / "assets").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert assets - shipped == set()
