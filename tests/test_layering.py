"""The package's import layers: every import of one crate_alpha module by another (at the top of
a file or inside a function) goes to the same layer or a lower one, and no imports go round in
a cycle. Read from the source with ``ast``, so nothing is imported and no edge hides behind a
lazy import."""
import ast
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

PACKAGE = "crate_alpha"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# lowest first; a name stands for the module and, for a package, everything in it
LAYERS = [
    ["errors", "common"],
    ["data"],
    ["recipe", "run_folder", "device", "visualize"],
    ["models"],
    ["convert"],
    ["clip", "classifier"],
    ["whitebox"],
    ["apps"],
    ["cli", "", "configs", "__main__"],  # "": the package itself (its __init__)
]


class Edge(NamedTuple):
    source: str
    target: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_package(name: str, known: Dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _resolve(source: str, known: Dict[str, Path], level: int, module: Optional[str]) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``source``."""
    if not level:
        return module or ""
    base = source.split(".") if is_package(source, known) else source.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, known: Dict[str, Path]) -> List[Edge]:
    """The crate_alpha modules ``source`` imports: ``from X import name`` imports X.name when that
    is a module, else X (a package's ``__init__`` is the package)."""
    tree = ast.parse(known[source].read_text(), str(known[source]))
    edges = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(source, known, node.level, node.module)
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.append(sub if sub in known else base)
        for t in targets:
            if _ours(t) and t != source:
                edges.append(Edge(source, t, node.lineno))
    return edges


def layer_of(name: str) -> Optional[int]:
    rest = name[len(PACKAGE) + 1:] if name != PACKAGE else ""
    top = rest.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return None


def _graph():
    known = modules()
    return known, [e for m in known for e in imports_of(m, known)]


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name != PACKAGE else f"{PACKAGE} (__init__)"


def _cycles(edges: List[Edge]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list."""
    graph: Dict[str, List[str]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e.target)
        graph.setdefault(e.target, [])
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_graph_is_read():
    # the reader sees what is there: lazy imports, relative imports of modules and of packages
    known, edges = _graph()
    pairs = {(e.source, e.target) for e in edges}
    assert f"{PACKAGE}.cli" in known and f"{PACKAGE}.errors" in known
    assert (f"{PACKAGE}.cli", f"{PACKAGE}.errors") in pairs  # from .errors import CrateAlphaError
    assert (f"{PACKAGE}.cli", f"{PACKAGE}.convert.hub") in pairs  # inside a function
    assert (f"{PACKAGE}.run_folder", f"{PACKAGE}.data.ownership") in pairs  # from .data import ownership


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_upward_import():
    known, edges = _graph()
    upward = sorted({(e.source, e.target, e.line) for e in edges
                     if layer_of(e.target) is not None and layer_of(e.source) is not None
                     and layer_of(e.target) > layer_of(e.source)})
    assert not upward, "imports from a higher layer:\n" + "\n".join(
        f"  {_short(s)} (layer {layer_of(s)}, {known[s].relative_to(SRC.parent)}:{line}) imports {_short(t)} "
        f"(layer {layer_of(t)})" for s, t, line in upward)


def _shortest_cycle(start: str, inside: set, edges: List[Edge]) -> List[str]:
    """The shortest path of imports from ``start`` back to itself within ``inside`` (breadth first)."""
    nxt: Dict[str, List[str]] = {}
    for e in edges:
        if e.source in inside and e.target in inside:
            nxt.setdefault(e.source, []).append(e.target)
    came, frontier = {}, [start]
    while frontier:
        step = []
        for v in frontier:
            for w in sorted(nxt.get(v, [])):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came:
                    came[w] = v
                    step.append(w)
        frontier = step
    return []


def test_no_import_cycle():
    known, edges = _graph()
    lines = []
    for component in _cycles(edges):
        seen = set()
        for start in component:  # each module's shortest way round, once per set of modules
            path = _shortest_cycle(start, set(component), edges)
            if path and frozenset(path) not in seen:
                seen.add(frozenset(path))
                lines.append("  " + " -> ".join(map(_short, path)))
    assert not lines, "import cycles (each arrow an import):\n" + "\n".join(lines)


@pytest.mark.parametrize("edges, cycle", [
    ([Edge("a", "b", 1), Edge("b", "c", 1), Edge("c", "a", 1), Edge("c", "d", 1)], [["a", "b", "c"]]),
    ([Edge("a", "b", 1), Edge("b", "c", 1)], []),
])
def test_cycle_finder(edges, cycle):
    assert _cycles(edges) == cycle
    if cycle:
        assert _shortest_cycle("b", set(cycle[0]), edges) == ["b", "c", "a", "b"]


def test_layer_rule_itself():
    assert layer_of(f"{PACKAGE}.errors") == layer_of(f"{PACKAGE}.common") == 0
    assert layer_of(f"{PACKAGE}.data.shards") < layer_of(f"{PACKAGE}.recipe") < layer_of(f"{PACKAGE}.models.crate")
    assert layer_of(PACKAGE) == layer_of(f"{PACKAGE}.cli") == len(LAYERS) - 1
    assert layer_of(f"{PACKAGE}.nonesuch") is None
