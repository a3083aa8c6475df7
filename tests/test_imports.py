"""The package's import graph: no cycles, and no import against the layer rule.

Layers, lowest first: core (everything not named below: sampling, verification, theory,
protocols, generation, corpus, timing, reference.*, the package itself) <- manifest <-
ort_backend.* <- export.* <- cli (quickdraft.cli, every module named ``cli``,
quickdraft.__main__ and quickdraft.serve*). A module may import its own layer or lower
ones. Every import counts, at any depth (function-level lazy imports, ``if
TYPE_CHECKING`` blocks, relative forms), and so do ``importlib.import_module`` calls: with
a literal name, that module; with a computed one, every string in the file that names a
module of the package (the tables such calls read, like the CLI's verb modules). Read
with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "quickdraft"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
LAYERS = ("core", "manifest", "ort_backend", "export", "cli")


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[-1] in ("cli", "__main__") or module == f"{PACKAGE}.cli" or (
        len(parts) > 1 and parts[1].startswith("serve")
    ):
        return "cli"
    if len(parts) > 1 and parts[1] in ("export", "ort_backend", "manifest"):
        return parts[1]
    return "core"


def modules() -> dict[str, Path]:
    """Module name -> file of every module of the package (a package is its __init__)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(current: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module named by ``from <level dots><name> import ...`` in ``current``."""
    if level == 0:
        return name or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``module`` imports anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    strings: set[str] = set()
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:  # `from a import b`: the module a.b, or a name in a
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in known else base)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value)
                else:
                    dynamic = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    if dynamic:
        names.update(s for s in strings if s in known)
    edges = set()
    for name in names:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        # the longest prefix that is a module of the package (a.b.name -> a.b)
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        target = ".".join(parts)
        if target and target != module:
            edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a
    cycle through its members in import order where one is found."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """One cycle a -> ... -> a inside a strongly connected set (breadth-first)."""
    start = min(members)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return sorted(members)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            if rank[layer(target)] > rank[layer(source)]:
                bad.append(f"{source} ({layer(source)}) -> {target} ({layer(target)})")
    return bad


# -- the checker itself --------------------------------------------------------------------


def test_layers_of_named_modules():
    assert layer("quickdraft.sampling") == layer("quickdraft.reference.models") == "core"
    assert layer("quickdraft.verification.graph") == layer("quickdraft") == "core"
    assert layer("quickdraft.manifest") == "manifest"
    assert layer("quickdraft.ort_backend.device") == layer("quickdraft.ort_backend") == (
        "ort_backend")
    assert layer("quickdraft.export.builder") == "export"
    for cli in ("quickdraft.cli", "quickdraft.export.cli", "quickdraft.ort_backend.cli",
                "quickdraft.reference.cli", "quickdraft.serve", "quickdraft.serve.app",
                "quickdraft.__main__"):
        assert layer(cli) == "cli", cli


def test_every_import_form_is_found(tmp_path):
    known = {"quickdraft", "quickdraft.a", "quickdraft.a.b", "quickdraft.a.c", "quickdraft.d"}
    source = tmp_path / "b.py"
    source.write_text(
        "import os\n"
        "from . import c\n"  # sibling module through the package
        "from .. import d\n"
        "def f():\n"
        "    import quickdraft.d.missing\n"  # a name below a module: the module
        "    from quickdraft.a import something\n"  # a name in a package: the package
        "class K:\n"
        "    def g(self):\n"
        "        import importlib\n"
        "        importlib.import_module('quickdraft')\n"
    )
    assert imported("quickdraft.a.b", source, known) == {
        "quickdraft.a.c", "quickdraft.d", "quickdraft.a", "quickdraft"}
    init = tmp_path / "__init__.py"
    init.write_text("from .b import x\nfrom . import c\n")
    assert imported("quickdraft.a", init, known) == {"quickdraft.a.b", "quickdraft.a.c"}


def test_cycles_and_violations_are_reported():
    graph = {"quickdraft.sampling": {"quickdraft.ort_backend.model"},
             "quickdraft.ort_backend.model": {"quickdraft.export.api"},
             "quickdraft.export.api": {"quickdraft.ort_backend.model", "quickdraft.manifest"},
             "quickdraft.manifest": set()}
    assert cycles(graph) == [["quickdraft.export.api", "quickdraft.ort_backend.model",
                              "quickdraft.export.api"]]
    assert layer_violations(graph) == [
        "quickdraft.ort_backend.model (ort_backend) -> quickdraft.export.api (export)",
        "quickdraft.sampling (core) -> quickdraft.ort_backend.model (ort_backend)",
    ]


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "quickdraft.manifest" in graph["quickdraft.export.greedy"]
    assert "quickdraft.export.builder" in graph["quickdraft.export.api"]  # a lazy import
    # import_module over a table of names: the lazy attributes and the CLI's verbs
    assert {"quickdraft.export.api", "quickdraft.export.checks"} <= graph["quickdraft.export"]
    assert "quickdraft.export.cli" in graph["quickdraft.cli"]


# -- the package ---------------------------------------------------------------------------


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_follow_the_layers():
    bad = layer_violations(import_graph())
    assert not bad, (
        "imports against the layer rule (core <- manifest <- ort_backend <- export <- cli; a "
        "module imports only its own layer or lower ones):\n" + "\n".join(bad)
    )


def test_export_helpers_sit_below_api_and_static():
    """api -> static -> common and output, never back."""
    graph = import_graph()
    assert "quickdraft.export.builder" in graph["quickdraft.export.api"]
    for low in ("quickdraft.export.builder", "quickdraft.export.common",
                "quickdraft.export.output"):
        assert "quickdraft.export.api" not in graph[low], low
    for low in ("quickdraft.export.common", "quickdraft.export.output"):
        assert "quickdraft.export.builder" not in graph[low], low
