"""The package's import graph (every import statement, those inside functions included): no cycles, and no module
imports a module of a higher layer (shared/DESIGN.md's picture, data flowing one way, downwards)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "r1lab"

# Layers, top to bottom; a module may import its own layer and those below. The package's __init__ files are
# its public faces (r1lab/__init__.py re-exports the API) and are not layered; imports *of* them resolve to the
# modules they name.
LAYERS = [
    {"r1lab.cli"},
    {"r1lab.speedrun", "r1lab.plan"},
    {"r1lab.train", "r1lab.eval", "r1lab.serve"},
    {"r1lab.rewards", "r1lab.parallel", "r1lab.lora", "r1lab.checkpoint", "r1lab.tasks", "r1lab.metrics"},
    {"r1lab.model", "r1lab.engine", "r1lab.tokenizer", "r1lab.tools", "r1lab.grading", "r1lab.data"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The r1lab modules that `name` imports: `from . import x` of a submodule counts as that submodule."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out.update(subs)
            if len(subs) < len(node.names) and target in MODULES:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
    out.discard(name)
    return out


def layer(name: str) -> int | None:
    for i, group in enumerate(LAYERS):
        if any(name == g or name.startswith(g + ".") for g in group):
            return i
    return None


def test_every_module_has_a_layer():
    assert {m for m in MODULES if m != "r1lab" and layer(m) is None} == set()


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} -> {t}" for m in MODULES for t in imports(m)
              if MODULES[m].name != "__init__.py" and MODULES[t].name != "__init__.py" and layer(t) < layer(m)]
    assert upward == []


def test_no_import_cycles():
    graph = {m: imports(m) for m in MODULES}
    # Imports of a package's own __init__ from inside it are how Python loads packages, not a design cycle.
    graph = {m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in graph.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: the graph of the package as it was (rewards importing train.reward_model,
    which imports rewards back) is one cycle and one upward import."""
    assert layer("r1lab.rewards") > layer("r1lab.train.reward_model")  # rewards sits below train
    graph = {"r1lab.rewards": {"r1lab.train.reward_model"}, "r1lab.train.reward_model": {"r1lab.rewards"}}
    upward = [(m, t) for m, ts in graph.items() for t in ts if layer(t) < layer(m)]
    assert upward == [("r1lab.rewards", "r1lab.train.reward_model")]
    pkg = tmp_path / "r1lab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\ndef f():\n    from ..c import x\n")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "c.py").write_text("from .sub.a import f\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    monkeypatch.setattr(__import__(__name__), "MODULES", {module_name(p): p for p in pkg.rglob("*.py")})
    assert imports("r1lab.sub.a") == {"r1lab.sub.b", "r1lab.c"}  # function-level imports count
    assert imports("r1lab.c") == {"r1lab.sub.a"}
