"""The package's shape: no import cycle, lower packages never import higher ones, nothing
under src/ imports the experiments, and no module is over 400 lines.

Every module of ``src/halforder`` is parsed (not imported), and every import in it counts,
function-level ones included. The layers, lowest first:

    estimators  <  planning, toy, training  <  diffusion  <  the command line (halforder.cli, __main__)

``planning``, ``toy`` and ``training`` are side by side: none imports another. ``diffusion`` is
four layers, lowest first, and the package itself (its public names) above them:

    diffusion.sampling (the chain machinery)  <  diffusion.models  <  diffusion.rewards
        <  diffusion.app (the application)  <  halforder.diffusion

Every module of ``diffusion`` lies in one of the four.
"""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
DIFFUSION_LAYERS = ("halforder.diffusion.sampling", "halforder.diffusion.models", "halforder.diffusion.rewards",
                    "halforder.diffusion.app")
LAYER = {"halforder": 0, "halforder.estimators": 1, "halforder.planning": 2, "halforder.toy": 2,
         "halforder.training": 2, **{name: 3 + i for i, name in enumerate(DIFFUSION_LAYERS)},
         "halforder.diffusion": 7, "halforder.cli": 8, "halforder.__main__": 8}
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


def _targets(name: str, path: pathlib.Path) -> set[str]:
    """The modules of src that ``name`` imports, itself left out."""
    targets = set()
    for mod in _imports(name, path):
        while mod and mod not in MODULES:      # `from pkg import name` where name is not a module
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            targets.add(mod)
    return targets


def _graph() -> dict[str, set[str]]:
    # a package's own parents are loaded first: no edge to them (their layers are checked apart)
    return {name: {t for t in _targets(name, path) if not name.startswith(t + ".")} for name, path in MODULES.items()}


def _parent_imports() -> dict[str, set[str]]:
    """The packages above a module that it imports (``from .. import x``, ``from halforder.diffusion import x``)."""
    return {name: {t for t in _targets(name, path) if name.startswith(t + ".")} for name, path in MODULES.items()}


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
    assert not layer_violations({"halforder.diffusion.app.run": {"halforder.training.loop"}})
    assert layer_violations({"halforder.estimators.engine": {"halforder.planning.search"}})
    assert layer_violations({"halforder.planning.search": {"halforder.toy.linear"}})
    # within diffusion: sampling < models < rewards < app < the package's public names
    assert layer_violations({"halforder.diffusion.sampling.chain": {"halforder.diffusion.models.families"}}) == \
        ["halforder.diffusion.sampling.chain imports halforder.diffusion.models.families"]
    assert layer_violations({"halforder.diffusion.models.components": {"halforder.diffusion.rewards"}})
    assert layer_violations({"halforder.diffusion.rewards.video": {"halforder.diffusion.app.config"}})
    assert layer_violations({"halforder.diffusion.app.task": {"halforder.diffusion"}})
    assert layer_violations({"halforder.diffusion.models.lora": {"halforder.training.files"}}) == []
    assert not layer_violations({"halforder.diffusion.app.run": {"halforder.diffusion.sampling.chain",
                                                                 "halforder.diffusion.models.sd_chain",
                                                                 "halforder.diffusion.rewards.video"}})


def test_every_module_is_seen_with_its_function_level_imports():
    graph = _graph()
    assert len(graph) >= 30
    # function-level imports count: the command line imports the diffusion CLI inside main()
    assert "halforder.diffusion.app.cli" in graph["halforder.cli"]


def test_no_import_cycle():
    assert find_cycle(_graph()) is None


def test_no_lower_package_imports_a_higher_one():
    assert layer_violations(_graph()) == []


def test_no_module_imports_a_parent_package_in_a_higher_layer():
    """``halforder.diffusion`` imports every layer for its public names: a module inside it that
    imports them reaches the application, whatever its own layer."""
    assert layer_violations(_parent_imports()) == []


def test_every_diffusion_module_lies_in_one_of_its_four_layers():
    graph = _graph()
    outside = [n for n in graph if n.startswith("halforder.diffusion.")
               and not any(n == p or n.startswith(p + ".") for p in DIFFUSION_LAYERS)]
    assert outside == []
    for layer in DIFFUSION_LAYERS:
        assert any(n.startswith(layer + ".") for n in graph), layer


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
