"""The package layers point down only, and no module imports itself through others.

    experiments  ->  lightning_modules  ->  datamodules

``datamodules`` imports neither ``lightning_modules`` nor ``experiments``; ``lightning_modules``
does not import ``experiments``. Every import counts, also those inside functions (a lazy
import still ties the layers together)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO_ROOT

REPO = REPO_ROOT
PACKAGES = ("datamodules", "lightning_modules", "experiments")
RANK = {name: i for i, name in enumerate(PACKAGES)}  # may import only ranks <= its own


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (resolved to existing module names)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def test_layers_point_down_only():
    upward = sorted(f"{m} imports {t}" for m, ts in _graph().items() for t in ts
                    if RANK[t.split(".")[0]] > RANK[m.split(".")[0]])
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is not a cycle between modules.
    graph = {m: {t for t in ts if not (t.startswith(m + ".") and (REPO / Path(*m.split(".")))
                                       .is_dir())} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """Sensitivity: a lazy upward import is found."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from experiments.common import track\n")
    mods = {"experiments.common": Path("e"), "datamodules.x": f}
    assert _imports(f, "datamodules.x", mods) == {"experiments.common"}
