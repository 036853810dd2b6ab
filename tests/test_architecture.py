"""The layering of the library, checked on the source (docs/architecture.md).

Every module of library/ and networks/ is parsed with `ast` and each import is read, including the imports inside
functions (which is where a hidden dependency would sit). The rules:

* library/train (training) and library/sample (generation) never import each other: what both need lives below
  them (library/families, library/prompts, library/models, ...);
* no module of library/ or networks/ imports tools/ (the command-line tools sit on top of the library);
* the subpackages of library/ import each other without cycles, so each can be read knowing only the ones below.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("library", "networks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in the file, at any depth; relative imports resolved; `from a import b` gives
    `a.b` too, since b may be a submodule."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return found


def all_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) over library/ and networks/."""
    edges = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            edges += [(module_name(path), target, line) for target, line in imported_modules(path)]
    return edges


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_local_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function counts, relative imports resolve."""
    pkg = tmp_path / "library" / "train"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..sample import gen\n    import tools.canny\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert imported_modules(pkg / "x.py") == [("library.sample", 2), ("library.sample.gen", 2), ("tools.canny", 3)]


@pytest.mark.parametrize("source, target", [("library.train", "library.sample"), ("library.sample", "library.train")])
def test_training_and_generation_do_not_import_each_other(source, target):
    bad = [f"{m}:{line} imports {t}" for m, t, line in all_imports() if within(m, source) and within(t, target)]
    assert not bad, "\n".join(bad)


def test_library_does_not_import_tools():
    bad = [f"{m}:{line} imports {t}" for m, t, line in all_imports() if within(t, "tools")]
    assert not bad, "\n".join(bad)


def subpackage(module: str) -> str | None:
    """library.<sub> for a module inside a subpackage of library/ (top-level library modules are leaves)."""
    parts = module.split(".")
    if parts[0] != "library" or len(parts) < 2 or not (REPO / "library" / parts[1]).is_dir():
        return None
    return f"library.{parts[1]}"


def test_library_subpackages_have_no_import_cycles():
    graph: dict[str, dict[str, str]] = {}
    for module, target, line in all_imports():
        a, b = subpackage(module), subpackage(target)
        if a and b and a != b:
            graph.setdefault(a, {}).setdefault(b, f"{module}:{line} imports {target}")
    # depth-first search for a back edge; report the cycle with one witness import per edge
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                return [graph[x][y] for x, y in zip(cycle, cycle[1:])]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            pytest.fail("import cycle between library subpackages:\n" + "\n".join(cycle))
