"""The import graph of src/lmlab is layered: no cycles, and components never import recipes or the training loop.

Recipes compose components into runs: `lmlab.studies.*` (the harness, the studies, the pretraining of the tiny
bases), `lmlab.cli`, `lmlab.bench` and `lmlab.benchsuite.*`. The training loop is `lmlab.engine.train`. Everything
else is a component (config, errors, fileio, progress, stats, data, models, eval, kernels, hylorada, latentwire, mu,
the rest of engine). Every import counts - at module level or inside a function - except those under
`if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lmlab"
RECIPES = ("lmlab.studies", "lmlab.cli", "lmlab.bench", "lmlab.benchsuite")
TRAINING_LOOP = "lmlab.engine.train"

Graph = dict[str, dict[str, list[str]]]  # module -> imported module -> where ("path:line")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_package: bool) -> Iterable[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import that can run: module level or in a function, not under
    `if TYPE_CHECKING:`; relative imports resolved; `importlib.import_module("...")` with a literal name too."""
    package = name if is_package else name.rpartition(".")[0]
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [alias.name for alias in node.names], node.lineno
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, [], node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = SRC, package: str = PACKAGE) -> Graph:
    """Edges between the modules of `package` under `root` (`from a import b` is an edge to `a.b` when that is a
    module, else to `a`)."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, dict[str, set[tuple[str, int]]]] = {name: {} for name in paths}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = f"{path.relative_to(root.parent)}"
        for module, names, line in _imports(tree, name, path.name == "__init__.py"):
            targets = [f"{module}.{n}" if f"{module}.{n}" in paths else module for n in names] or [module]
            for target in targets:
                if target in paths and target != name:
                    graph[name].setdefault(target, set()).add((where, line))
    return {name: {target: [f"{w}:{n}" for w, n in sorted(places)] for target, places in edges.items()}
            for name, edges in graph.items()}


def _edge(graph: Graph, source: str, target: str) -> str:
    return f"{source} -> {target} ({', '.join(graph[source][target])})"


def cycles(graph: Graph) -> list[str]:
    """One entry per strongly connected component of more than one module: its modules and the edges inside it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
    out = []
    for component in found:
        edges = [_edge(graph, a, b) for a in component for b in sorted(graph[a]) if b in component]
        out.append(f"cycle among {', '.join(component)}: " + "; ".join(edges))
    return out


def layer_violations(graph: Graph, recipes: tuple[str, ...] = RECIPES, training_loop: str = TRAINING_LOOP) -> list[str]:
    """Edges that go up the layers: a non-recipe importing a recipe, a component importing the training loop."""

    def is_recipe(module: str) -> bool:
        return any(module == r or module.startswith(r + ".") for r in recipes)

    out = []
    for source in sorted(graph):
        if is_recipe(source):
            continue
        for target in sorted(graph[source]):
            if is_recipe(target):
                out.append(f"{'training loop' if source == training_loop else 'component'} imports a recipe: "
                           + _edge(graph, source, target))
            elif target == training_loop:
                out.append("component imports the training loop: " + _edge(graph, source, target))
    return out


# ---------------------------------------------------------------------------------------------------
# The package


def test_the_import_graph_of_lmlab_has_no_cycles():
    problems = cycles(import_graph())
    assert not problems, "import cycles in src/lmlab:\n" + "\n".join(problems)


def test_components_never_import_recipes_or_the_training_loop():
    problems = layer_violations(import_graph())
    assert not problems, "imports against the layers of src/lmlab:\n" + "\n".join(problems)


def test_the_walk_sees_the_package_imports_it_must_see():
    """Guards the two tests above against an empty or blind walk: known edges, lazy ones included."""
    graph = import_graph()
    assert {"lmlab.stats", "lmlab.models.tiny", "lmlab.studies.pretrain", "lmlab.studies.registry",
            "lmlab.benchsuite.suite", "lmlab.bench"} <= set(graph)
    assert "lmlab.engine.train" in graph["lmlab.studies.pretrain"]
    assert "lmlab.models.tiny" in graph["lmlab.studies.pretrain"]
    assert "lmlab.stats" in graph["lmlab.latentwire.evaluate"]
    assert "lmlab.studies.registry" in graph["lmlab.studies.report"]
    assert "lmlab.studies.registry" in graph["lmlab.studies.runner"]
    assert "lmlab.benchsuite.suite" in graph["lmlab.bench"]  # imported inside run_benchmarks
    assert "lmlab.studies.runner" not in graph["lmlab.studies.registry"]  # only under TYPE_CHECKING


def test_lmlab_bench_loads_no_code_by_file_path():
    """`lmlab bench` imports the suite (lmlab.benchsuite) and runs it with `python -m`: nothing in the package loads
    a file by path."""
    offenders = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            named = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
                     else node.name if isinstance(node, ast.alias) else None)
            if named in ("spec_from_file_location", "SourceFileLoader", "run_path"):
                offenders.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {named}")
    assert not offenders, "\n".join(offenders)
    bench = (SRC / PACKAGE / "bench.py").read_text(encoding="utf-8")
    assert "spec_from_file_location" not in bench and '"-m", SUITE_MODULE' in bench


# ---------------------------------------------------------------------------------------------------
# The checker itself


def test_the_checker_names_the_offending_edges(tmp_path):
    files = {
        "__init__.py": "",
        "errors.py": "",
        "models/__init__.py": "",
        "models/tiny.py": "from pkg.engine.train import train\n",
        "engine/__init__.py": "",
        "engine/train.py": "from pkg import errors\n",
        "studies/__init__.py": "",
        "studies/stats.py": "",
        "studies/runner.py": "def go():\n    from pkg.studies import report\n",
        "studies/report.py": "from . import runner\n",
        "latentwire/__init__.py": "",
        "latentwire/evaluate.py": ("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from pkg.studies import runner\n"
                                   "def score():\n    from pkg.studies.stats import wilson\n"),
        "bench.py": "import importlib\nSUITE = importlib.import_module('pkg.studies.runner')\n",
    }
    for name, text in files.items():
        (tmp_path / "src" / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path / "src", "pkg")
    assert graph["pkg.studies.report"] == {"pkg.studies.runner": ["src/pkg/studies/report.py:1"]}  # relative import
    assert graph["pkg.latentwire.evaluate"] == {"pkg.studies.stats": ["src/pkg/latentwire/evaluate.py:5"]}
    assert graph["pkg.bench"] == {"pkg.studies.runner": ["src/pkg/bench.py:2"]}
    assert cycles(graph) == ["cycle among pkg.studies.report, pkg.studies.runner: "
                             "pkg.studies.report -> pkg.studies.runner (src/pkg/studies/report.py:1); "
                             "pkg.studies.runner -> pkg.studies.report (src/pkg/studies/runner.py:2)"]
    assert layer_violations(graph, ("pkg.studies", "pkg.bench"), "pkg.engine.train") == [
        "component imports a recipe: pkg.latentwire.evaluate -> pkg.studies.stats (src/pkg/latentwire/evaluate.py:5)",
        "component imports the training loop: pkg.models.tiny -> pkg.engine.train (src/pkg/models/tiny.py:1)",
    ]
