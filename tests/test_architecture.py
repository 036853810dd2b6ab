"""The layering of the library, checked on the source (docs/architecture.md).

Every module of library/ and networks/ is parsed with `ast` and each import is read, including the imports inside
functions (which is where a hidden dependency would sit). The rules:

* library/train (training) and library/sample (generation) never import each other: what both need lives below
  them (library/families, library/prompts, library/models, ...);
* no module of library/ or networks/ imports tools/ (the command-line tools sit on top of the library);
* the subpackages of library/ import each other without cycles, so each can be read knowing only the ones below;
* the family interface is typed: its hooks take a FamilyModels dataclass, and neither interface.py nor a family's
  hook signatures say `Any`.
"""
from __future__ import annotations

import ast
import inspect
import re
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


# ----------------------------------------------------------------------------------------------------------------
# The family interface is typed: every hook takes the family's FamilyModels dataclass (never a dict) and no `Any`
# appears in interface.py or in a family's hook signatures (docs/architecture.md, "The family interface").

ANY = re.compile(r"\bAny\b")


def hook_names() -> list[str]:
    """The hooks of ModelFamily: its public methods (required and optional)."""
    from library.families.interface import ModelFamily

    return sorted(n for n, v in vars(ModelFamily).items() if inspect.isfunction(v) and not n.startswith("_"))


def signature_problems(cls: type, names: list[str]) -> list[str]:
    """What is untyped or `Any`-typed in the signatures of `cls`'s methods `names` (those it defines or inherits),
    and every `models` parameter that is not the family's FamilyModels (a subclass, or the interface's type
    variable bound to it). Annotations are read as written (strings under `from __future__ import annotations`)."""
    import sys
    from typing import TypeVar

    from library.families.interface import FamilyModels

    problems = []
    for name in names:
        fn = getattr(cls, name)
        where = f"{cls.__name__}.{name}"
        sig = inspect.signature(fn)
        annotations = [(p.name, p.annotation) for p in list(sig.parameters.values())[1:]]
        annotations.append(("return", sig.return_annotation))
        for param, ann in annotations:
            if ann is inspect.Parameter.empty:
                problems.append(f"{where}: {param} has no annotation")
            elif ANY.search(str(ann)):
                problems.append(f"{where}: {param} is annotated {ann}")
        models = sig.parameters.get("models")
        if models is not None and models.annotation is not inspect.Parameter.empty:
            namespace = vars(sys.modules[fn.__module__])
            try:
                typ = eval(models.annotation, namespace) if isinstance(models.annotation, str) else models.annotation
            except NameError:
                typ = None
            bound = typ.__bound__ if isinstance(typ, TypeVar) else typ
            if not (isinstance(bound, type) and issubclass(bound, FamilyModels)):
                problems.append(f"{where}: models is annotated {models.annotation}, not a FamilyModels")
    return problems


def family_classes() -> list[type]:
    """ModelFamily and every family of the registry (their modules imported)."""
    import importlib

    from library.families.interface import ModelFamily
    from library.families.registry import KNOWN_FAMILIES, _REGISTRY

    for module in KNOWN_FAMILIES.values():
        importlib.import_module(module)
    return [ModelFamily, *_REGISTRY.values()]


def test_the_signature_check_sees_any_and_dicts():
    """The checker itself: a family whose hooks take a dict or `Any` is reported."""
    from library.families.interface import ModelFamily

    namespace: dict = {"__name__": ModelFamily.__module__}  # annotations resolve where the interface's do
    exec("from __future__ import annotations\nfrom typing import Any\n"
         "class Loose:\n"
         "    def encode_text(self, models: dict[str, Any], captions: list[str]) -> dict: ...\n"
         "    def predict(self, models: Any, inp, text: dict, batch: Any) -> Any: ...\n", namespace)
    problems = signature_problems(namespace["Loose"], ["encode_text", "predict"])
    assert "Loose.encode_text: models is annotated dict[str, Any]" in problems
    assert "Loose.predict: inp has no annotation" in problems
    assert "Loose.predict: return is annotated Any" in problems
    assert "Loose.predict: models is annotated Any, not a FamilyModels" in problems
    assert signature_problems(ModelFamily, ["encode_text"]) == []


@pytest.mark.parametrize("cls", family_classes(), ids=lambda c: c.__name__)
def test_family_hooks_are_typed_without_any(cls):
    assert len(hook_names()) >= 13  # the required and optional hooks of docs/architecture.md
    assert signature_problems(cls, hook_names()) == []


def test_interface_and_family_models_have_no_any():
    """interface.py never names `Any`, and the dataclasses that cross the interface have typed fields."""
    from dataclasses import fields

    from library.families.interface import FamilyModels, NoisyInput, SampleRequest

    tree = ast.parse((REPO / "library" / "families" / "interface.py").read_text(encoding="utf-8"))
    names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert "Any" not in names
    family_classes()  # imports the family modules, which define their FamilyModels subclasses
    models_types = [FamilyModels, *FamilyModels.__subclasses__()]
    assert {c.__name__ for c in models_types} >= {"FamilyModels", "SDXLFamilyModels", "FluxFamilyModels"}
    for cls in [*models_types, NoisyInput, SampleRequest]:
        for f in fields(cls):
            assert not ANY.search(str(f.type)), (cls.__name__, f.name, f.type)
