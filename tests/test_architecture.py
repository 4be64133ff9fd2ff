"""The house plan, checked: the import graph (no circle, no import from a lower layer into a higher one), where
Hydra, OmegaConf, lm-eval and peft may be imported, results.json's one writer, the commands' thin shape.
docs/architecture.md describes these layers; tests/test_config.py composes every config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

GISP = REPO / "gisp"

# Low to high: a module may import from its own layer and the layers before it (docs/architecture.md).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("gisp.errors", "gisp.io", "gisp.hub")),
    ("models", ("gisp.models",)),
    ("pruning", ("gisp.prune",)),
    ("lm-eval", ("gisp.eval.harness",)),
    ("data", ("gisp.data",)),
    ("compact", ("gisp.compact",)),
    ("memory", ("gisp.memory",)),
    ("evaluation", ("gisp.eval",)),
    ("passes", ("gisp.lightning",)),
    ("reconstruction", ("gisp.reconstruct",)),
    ("run dir", ("gisp.results", "gisp.runs", "gisp.level_loop", "gisp.loggers")),
    ("recovery", ("gisp.recovery",)),
    ("settings", ("gisp.config",)),
    ("library", ("gisp.pipeline", "gisp.deploy")),
    ("commands", ("gisp.run", "gisp.evaluate", "gisp.export", "gisp.recover", "gisp.plan", "gisp.cli", "gisp.sweeps",
                  "gisp")),
]
COMMANDS = ("gisp.run", "gisp.evaluate", "gisp.export", "gisp.recover", "gisp.plan")
ONLY_IN = {  # third-party packages confined to some modules
    "hydra": ("gisp.run", "gisp.evaluate", "gisp.export", "gisp.recover", "gisp.plan", "gisp.cli", "gisp.sweeps"),
    "omegaconf": ("gisp.run", "gisp.evaluate", "gisp.export", "gisp.recover", "gisp.plan", "gisp.cli", "gisp.sweeps"),
    "lm_eval": ("gisp.eval.harness",),
    "peft": ("gisp.recovery.students", "gisp.recovery.artefacts"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in GISP.rglob("*.py")}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imports(name: str) -> tuple[set[str], set[str]]:
    """(gisp modules, third-party top-level packages) that module `name` imports, at module level or inside
    functions (imports under `if TYPE_CHECKING:` are annotations only)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, theirs = set(), set()
    skip = {id(n) for node in ast.walk(tree) if _type_checking(node) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [stem, *(f"{stem}.{a.name}" for a in node.names)]
            else:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "gisp":
                theirs.add(target.split(".")[0])
                continue
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                ours.add(target)
    return ours, theirs


GRAPH = {name: imports(name) for name in MODULES}


def layer_of(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of LAYERS (tests/test_architecture.py, docs/architecture.md)"
    return best[0]


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = []
    for name, (ours, _) in GRAPH.items():
        for target in ours:
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name][0]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("package", sorted(ONLY_IN))
def test_third_party_packages_stay_where_they_belong(package):
    users = sorted(name for name, (_, theirs) in GRAPH.items() if package in theirs)
    assert set(users) <= set(ONLY_IN[package]), f"{package} is imported by {set(users) - set(ONLY_IN[package])}"


def test_results_json_has_one_writer():
    """Only gisp/results.py writes results.json: no other module passes a results path to an atomic writer."""
    writers = ("write_json_atomic", "write_text_atomic", "atomic_file")
    found = []
    for name, path in MODULES.items():
        if name == "gisp.results":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in writers:
                target = ast.unparse(node.args[0]) if node.args else ""
                if "results" in target.lower():
                    found.append(f"{name}: {ast.unparse(node)[:100]}")
    assert not found, found


def test_commands_are_thin():
    """A command module: a Hydra main (or gisp.plan's compose), plain config values, one library call, its table."""
    for name in COMMANDS:
        source = MODULES[name].read_text()
        assert "def main(" in source, name
        assert len(source.splitlines()) <= 80, f"{name} has {len(source.splitlines())} lines: move the work below it"
