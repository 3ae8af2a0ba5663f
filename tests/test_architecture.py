"""The package's shape: no import cycle, lower packages never import higher ones, nothing
under src/ imports the experiments, and no module is over 400 lines.

Every module of ``src/halforder`` is parsed (not imported), and every import in it counts,
function-level ones included. The layers, lowest first:

    estimators  <  planning, toy, training  <  diffusion  <  the command line (halforder.cli, __main__)

``planning``, ``toy`` and ``training`` are side by side: none imports another.
"""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
LAYER = {"halforder": 0, "halforder.estimators": 1, "halforder.planning": 2, "halforder.toy": 2,
         "halforder.training": 2, "halforder.diffusion": 3, "halforder.cli": 4, "halforder.__main__": 4}
MIDDLE = ("halforder.planning", "halforder.toy", "halforder.training")
SIDE_BY_SIDE = {(a, b) for a in MIDDLE for b in MIDDLE if a != b}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((SRC / "halforder").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module ``name`` imports (absolute names), at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for mod in _imports(name, path):
            while mod and mod not in MODULES:      # `from pkg import name` where name is not a module
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):   # a package's own parents are loaded first
                targets.add(mod)
        graph[name] = targets
    return graph


def _layer(name: str) -> tuple[str, int]:
    key = max((k for k in LAYER if name == k or name.startswith(k + ".")), key=len)
    return key, LAYER[key]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a list of modules), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower package into a higher one, or between side-by-side packages."""
    bad = []
    for name, targets in graph.items():
        (src, lo) = _layer(name)
        for t in targets:
            (dst, hi) = _layer(t)
            if hi > lo or (src, dst) in SIDE_BY_SIDE:
                bad.append(f"{name} imports {t}")
    return sorted(bad)


def test_the_checks_see_cycles_and_upward_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_violations({"halforder.estimators.theory": {"halforder.toy.stats"}}) == \
        ["halforder.estimators.theory imports halforder.toy.stats"]
    assert layer_violations({"halforder.toy.stats": {"halforder.training.loop"}})
    assert not layer_violations({"halforder.diffusion.run": {"halforder.training.loop"}})
    assert layer_violations({"halforder.estimators.engine": {"halforder.planning.search"}})
    assert layer_violations({"halforder.planning.search": {"halforder.toy.linear"}})


def test_every_module_is_seen_with_its_function_level_imports():
    graph = _graph()
    assert len(graph) >= 30
    # function-level imports count: the command line imports the diffusion CLI inside main()
    assert "halforder.diffusion.cli" in graph["halforder.cli"]


def test_no_import_cycle():
    assert find_cycle(_graph()) is None


def test_no_lower_package_imports_a_higher_one():
    assert layer_violations(_graph()) == []


def test_the_estimators_import_nothing_from_the_planner():
    """The planner builds on the core; a reader of halforder.estimators never meets it."""
    graph = _graph()
    core = [n for n in graph if _layer(n)[0] == "halforder.estimators"]
    assert len(core) >= 10 and "halforder.planning.search" in graph
    assert not [f"{n} imports {t}" for n in core for t in graph[n] if t.startswith("halforder.planning")]
    assert any(t.startswith("halforder.estimators") for t in graph["halforder.planning.search"])


def test_nothing_under_src_imports_the_experiments_or_benchmarks():
    for name, path in MODULES.items():
        imported = _imports(name, path)
        assert not [m for m in imported if m.split(".")[0] in ("experiments", "benchmarks", "tests")], name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_400_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= 400
