"""The code's shape, checked: no import cycles between the project's modules, no import hidden
in a function except of an optional extra, and the service's border typed by one protocol."""
from __future__ import annotations

import ast
from pathlib import Path

from fakes import FakeSearcher
from service.contract import SearchBackend

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoder", "indexer", "service")
OPTIONAL = {"onnxruntime", "onnx", "ray", "playwright", "schemathesis"}  # extras a module may lack


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    hidden = []
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        nested = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _targets(node, m, f.name == "__init__.py")
            graph[m].update(t for t in targets if t in mods and t != m)
            if id(node) in nested and targets[0].split(".")[0] not in OPTIONAL:
                hidden.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return graph, hidden


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles_between_modules():
    graph, _ = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself finds one


def test_no_import_hidden_in_a_function_except_optional_extras():
    _, hidden = _graph()
    assert hidden == []


def test_the_product_does_not_ship_test_doubles():
    assert not (ROOT / "service" / "fake.py").exists()
    graph, _ = _graph()
    assert not any(t.startswith(("tests", "fakes")) for deps in graph.values() for t in deps)


def test_the_test_double_implements_the_service_contract(tmp_path):
    # (the real Searcher: tests/test_indexer.py, on a built index)
    assert isinstance(FakeSearcher(tmp_path, n_images=2), SearchBackend)
