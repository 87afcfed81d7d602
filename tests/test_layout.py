"""The package's shape: no import cycles, no loss term that reaches for the engine, small units."""
import ast
from pathlib import Path

import dfkd

PACKAGE = Path(dfkd.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The dfkd modules ``path`` imports, at module level or inside functions (relative imports resolved)."""
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
        found |= {n for n in names if n.split(".")[0] == "dfkd"}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            while imported and imported not in modules:  # dfkd.x.Name -> dfkd.x
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


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


def test_find_cycle_finds_what_is_there():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    assert "dfkd.build" in edges["dfkd.engine"]  # the graph sees relative imports
    assert find_cycle(edges) is None, find_cycle(edges)


def test_loss_terms_never_refer_to_the_engine():
    source = (PACKAGE / "losses.py").read_text()
    tree = ast.parse(source)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "engine" not in names and "Engine" not in names
    assert "engine" not in imports_of(PACKAGE / "losses.py")


def test_the_loop_and_every_class_are_short():
    assert len((PACKAGE / "engine.py").read_text().splitlines()) < 300
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 300, f"{path.name}: class {node.name} is {length} lines"
