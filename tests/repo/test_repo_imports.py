"""No import cycles between the modules of the five distributions.

The graph is read from the sources with `ast`: every `import` and `from ... import` anywhere in a
module counts, those under `if TYPE_CHECKING:` and inside functions included (a lazy import only
hides a cycle; the modules still need each other). An edge goes to the module named, or to the
submodule when a name imported is one (`from . import _twins`). The import of a package's
`__init__` that every submodule implies is not an edge: `higher.optim.__init__` importing its
submodules is the layout, not a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules(sources: Iterable[Path]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's `__init__`)."""
    found: dict[str, tuple[Path, bool]] = {}
    for src in sources:
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph(sources: Iterable[Path]) -> dict[str, set[str]]:
    """Each module of the source folders -> the modules of those folders it imports."""
    modules = _modules(sources)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                edges.update(subs)
                if len(subs) < len(node.names):  # names defined in the module itself
                    edges.add(target)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph(sorted(ROOT.glob("packages/*/src")))
    assert "higher.patch._module" in graph and "higher.contrib._conformance" in graph
    assert cycles(graph) == [], "modules that import each other (directly or around a loop)"


def test_the_check_sees_type_checking_and_lazy_imports(tmp_path: Path) -> None:
    src = tmp_path / "src"
    pkg = src / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ._a import A\n")
    (pkg / "_a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._b import B\nA = 1\n"
    )
    (pkg / "_b.py").write_text("def f():\n    from . import _c\nB = 2\n")
    (pkg / "_c.py").write_text("from pkg._a import A\n")
    (pkg / "_d.py").write_text("from pkg import _a\n")  # the package's own import: no cycle
    graph = import_graph([src])
    assert graph["pkg._d"] == {"pkg._a"}
    assert cycles(graph) == [["pkg._a", "pkg._b", "pkg._c"]]
