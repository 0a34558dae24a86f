"""No import cycles in services/: every module can be imported on its own, and a module's place in
the layering is visible from its imports.

The graph has an edge A -> B for every import of B (a module of services/) in A, at module level or
inside a function (a lazy import only postpones a cycle to the first call); imports under
``if TYPE_CHECKING:`` never run and do not count, nor does the implicit import of B's parent
package (every package would then sit in a cycle with its own submodules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx  # a dependency of torch, so always installed with the project

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in (root / "services").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        children = node.orelse if _is_type_checking(node) else list(ast.iter_child_nodes(node))  # type: ignore[attr-defined]
        todo.extend(children)
    return out


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    """The graph, built in this process; in a fresh interpreter when ``ast.parse`` fails here.

    CPython 3.11.7 sometimes raises ``SystemError: AST constructor recursion depth mismatch`` from
    ``ast.parse`` on valid code once an earlier test in the same process left the AST converter's
    depth counter off (seen twice in full-suite runs, never alone).  The source is fine; only this
    process's parser state is not, so the same walk runs again in a new one."""
    try:
        return _import_graph(root)
    except SystemError:
        out = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, check=True)
        data = json.loads(out.stdout)
        graph = nx.DiGraph()
        graph.add_nodes_from(data["nodes"])
        graph.add_edges_from(map(tuple, data["edges"]))
        return graph


def _import_graph(root: Path) -> nx.DiGraph:
    mods = _modules(root)
    graph = nx.DiGraph()
    for name, (path, is_pkg) in mods.items():
        graph.add_node(name)
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a name defined in a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def test_services_have_no_import_cycles() -> None:
    graph = import_graph()
    assert graph.number_of_nodes() > 100 and graph.number_of_edges() > 300  # the walk found the imports
    cycles = [nx.find_cycle(graph.subgraph(scc)) for scc in nx.strongly_connected_components(graph) if len(scc) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(a for a, _ in c) + f" -> {c[0][0]}" for c in cycles)


def test_the_report_reads_only_results_and_the_run_view() -> None:
    """report.html is rebuilt from a copied run directory: it must not pull in the writing side."""
    reach = nx.descendants(import_graph(), "services.sink.report")
    writing = {"services.sink.finalize", "services.sink.run_writer", "services.sink.storage",
               "services.sink.service", "services.sink.summary", "services.sink.map_sample"}
    assert not reach & writing, sorted(reach & writing)
    assert "services.sink.run_view" in reach


def test_the_graph_sees_lazy_imports_and_skips_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "services"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from services.b import g\n    return g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services import c\n"
                              "import services.a\n")
    (pkg / "c.py").write_text("from . import b\n")
    graph = import_graph(tmp_path)
    assert set(graph.edges) == {("services.a", "services.b"), ("services.b", "services.a"),
                                ("services.c", "services.b")}


if __name__ == "__main__":  # the fresh interpreter import_graph falls back to
    g = _import_graph(Path(sys.argv[1]))
    print(json.dumps({"nodes": list(g.nodes), "edges": list(g.edges)}))
