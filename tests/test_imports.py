"""The import graph of lcjax: no cycles, and imports run one way (STYLE §2.2: train -> models -> layers -> ops).

The graph is read statically (``ast``) from every module under ``lcjax/``: every ``import``/``from ... import``
statement counts, at module level or inside a function (a lazy import hides a cycle, it does not remove it).
An edge goes to the module named (``from lcjax.ops import rope`` -> ``lcjax.ops.rope`` when that is a module,
else to the package ``lcjax.ops``); the implicit import of parent packages is not an edge.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "lcjax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The lcjax modules ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import lcjax.ops.ssd.x`-style names: the module part
                target = target.rpartition(".")[0]
            if target.startswith("lcjax") and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan), as a readable path."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:  # a shortest path back to the start, inside the component
        start, members = comp[0], set(comp)
        paths, seen = {start: [start]}, {start}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members - seen):
                    paths[w] = paths[v] + [w]
                    seen.add(w)
                    nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        cycles.append(paths[last] + [start])
    return cycles


def test_graph_is_read():
    assert "lcjax.models.lm" in GRAPH and "lcjax.ops.attention" in GRAPH["lcjax.layers.attention"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles in lcjax/:\n" + "\n".join(" -> ".join(c) for c in cycles)


# (importer prefix, forbidden imported prefixes): the one-way layering of STYLE §2.2
LAYERING = [
    ("lcjax.ops", ("lcjax.layers", "lcjax.models", "lcjax.train", "lcjax.cli")),
    ("lcjax.layers", ("lcjax.models", "lcjax.train", "lcjax.cli")),
    ("lcjax.models", ("lcjax.train", "lcjax.cli")),
    ("lcjax.train", ("lcjax.cli",)),
]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("importer, forbidden", LAYERING, ids=[p for p, _ in LAYERING])
def test_layering(importer, forbidden):
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items() if _under(name, importer)
        for target in targets if any(_under(target, f) for f in forbidden)
    )  # fmt: skip
    assert not bad, "\n".join(bad)
