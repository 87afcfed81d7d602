"""The packages' shape: layers whose imports point only downward, no import cycle between modules
or between packages, loss terms that never reach for the loop, small modules, and a docstring on
every package."""
import ast
from pathlib import Path

import dfkd

ROOT = Path(dfkd.__file__).parent.parent
PACKAGES = ("dfkd_base", "generators", "dfkd")
# lowest first: a module may import from its own layer and the layers before it
LAYERS = ["dfkd_base", "dfkd.core", "dfkd.data", "dfkd.nets", "generators", "dfkd.methods", "dfkd.loop", "dfkd.tools",
          "dfkd.cli", "dfkd.__main__"]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The names ``path`` imports from the three packages, at module level or inside functions
    (relative imports resolved): ``from a.b import c`` gives ``a.b`` and ``a.b.c``."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (a name imported from a module counts as that module)."""
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for imported in imports_of(path):
            while imported and imported not in known:  # dfkd.x.Name -> dfkd.x
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def package_of(module: str) -> str:
    """The package a module belongs to: dfkd's layer subpackage (``dfkd.loop``), else its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "dfkd" else parts[0]


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in edges.items():
        out.setdefault(package_of(module), set()).update(package_of(t) for t in targets if package_of(t) !=
                                                          package_of(module))
    return out


def layer_of(module: str) -> int:
    return max(i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")) \
        if any(module == layer or module.startswith(layer + ".") for layer in LAYERS) else -1


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """An import cycle as [a, b, ..., a] (the shortest through its first module), or None."""
    for start in sorted(edges):
        parent, queue = {start: None}, [start]
        while queue:
            node = queue.pop(0)
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets if layer_of(t) > layer_of(m))


def test_find_cycle_finds_what_is_there():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]


def test_the_graph_sees_absolute_relative_and_function_level_imports(tmp_path):
    edges = graph()
    assert "dfkd.loop.build" in edges["dfkd.loop.engine"]
    assert "dfkd.nets.quant" in edges["dfkd.nets.arch"]          # imported inside a function
    assert "dfkd_base.registry" in edges["generators"]
    fake = tmp_path / "dfkd" / "x" / "y.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..loop import engine\nfrom . import z\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_of(fake) == {"dfkd.loop", "dfkd.loop.engine", "dfkd.x", "dfkd.x.z"}
    finally:
        ROOT = saved


def test_every_module_has_a_layer_and_imports_point_downward():
    edges = graph()
    assert [m for m in edges if layer_of(m) < 0] == ["dfkd"]   # the top package itself: a docstring only
    assert upward_imports(edges) == []
    # what the check catches: the loop imported from the methods layer
    assert upward_imports({"dfkd.methods.losses.base": {"dfkd.loop.engine"}}) == \
        ["dfkd.methods.losses.base -> dfkd.loop.engine"]


def test_no_module_and_no_package_imports_one_that_imports_it_back():
    edges = graph()
    assert find_cycle(edges) is None, find_cycle(edges)
    packages = package_graph(edges)
    assert find_cycle(packages) is None, find_cycle(packages)
    assert packages["generators"] == {"dfkd_base"} and packages["dfkd_base"] == set()
    assert "generators" in packages["dfkd.methods"]


def test_loss_terms_never_refer_to_the_loop():
    for path in (ROOT / "dfkd" / "methods" / "losses").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
            {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not {"engine", "Engine"} & names, path.name
        assert not [m for m in imports_of(path) if m.startswith("dfkd.loop")], path.name


def test_modules_are_small_and_every_package_says_what_it_holds():
    for name, path in modules().items():
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name} is over {MAX_LINES} lines"
        if path.name == "__init__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), f"package {name} has no docstring"
    assert len((ROOT / "dfkd" / "loop" / "engine.py").read_text().splitlines()) < 300
    for path in (ROOT / "dfkd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 300, f"{path.name}: class {node.name} is {length} lines"
