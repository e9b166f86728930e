"""Imports in ``src/piggyback`` go one way: from a layer to itself or the layers below it.

Every ``import`` / ``from ... import`` is read with ``ast`` (module level, inside functions and
under ``if TYPE_CHECKING:`` alike). The test fails on an import from a lower layer to a
higher one, on any circle between modules, on an import of ``piggyback`` inside a function
(the old way of dodging a circle), and on a function-level third-party import without a
comment on its line saying why it is deferred (optional or heavy packages only).

The layers, lowest first, are drawn in docs/development.md ("Layers"); keep the two in step.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The layers, lowest first, as the folders of ``src/piggyback`` that make them up: a module's
# layer is the folder it sits in. The package root holds only ``__init__`` and the two entry
# modules; any other module at the root, or a folder missing here, fails the test.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # helpers that know nothing of models: atomic writes, the checkpoint writer, the run lock,
    # Hydra instantiate, resolvers, the console (utils); the decathlon score and the
    # continual-learning formulas (scores); optimizers (optim)
    ("base", ("utils", "scores", "optim")),
    # DataModules and plain architectures: know no model, mask or method
    ("data", ("data", "nets")),
    # the registry of pretrained networks (the demo's pretraining uses the digits data)
    ("backbones", ("backbones",)),
    # mask mechanics: reparametrization, straight-through thresholds, mask_model/materialize
    ("nn", ("nn",)),
    # mask tensors: packing, the rice codec, statistics, plots
    ("masks", ("masks",)),
    # task artifact and bundle files: read, write, validate, fingerprint (knows no method)
    ("formats", ("formats",)),
    # one class per method + registry; applying and extracting artifacts
    ("methods", ("methods",)),
    # the LightningModule, the multi-task model, task storage, task inference; the PEFT-style
    # API for use outside the Hydra app (api)
    ("models", ("models", "taskinfer", "api")),
    # the steps train and evaluate are made of, their guards and reports, the config checks
    ("steps", ("training", "evaluation", "config")),
]
# the only modules allowed at the package root besides ``__init__``: orchestration only
ENTRY_MODULES = ("train", "evaluate")
ENTRY = len(LAYERS)


def layer_name(index: int) -> str:
    return "entry" if index == ENTRY else LAYERS[index][0]


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a piggyback module, or a third-party top-level name)
    line: int
    in_function: bool
    commented: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "piggyback").rglob("*.py"))}


def _resolve(modules: dict[str, Path], base: str, names: list[str]) -> list[str]:
    """``from base import a, b``: submodules where ``a``/``b`` are modules, else ``base``."""
    targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
    if len(targets) < len(names):
        targets.append(base)
    return targets


def read_imports(root: Path) -> tuple[dict[str, Path], list[Import]]:
    modules = _modules(root)
    found: list[Import] = []
    for name, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                names = [alias.name for alias in node.names]
                targets = _resolve(modules, base, names) if base.startswith("piggyback") else [base]
            else:
                continue
            for target in targets:
                if not target.startswith("piggyback"):
                    target = target.partition(".")[0]
                elif target not in modules:
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                found.append(
                    Import(
                        source=name,
                        target=target,
                        line=node.lineno,
                        in_function=id(node) in in_function,
                        commented="#" in lines[node.lineno - 1],
                    )
                )
    return modules, found


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name, read from its folder (None: it has no layer)."""
    parts = module.split(".")
    if parts == ["piggyback"]:
        return 0
    if len(parts) == 2 and parts[1] in ENTRY_MODULES:
        return ENTRY
    for index, (_, folders) in enumerate(LAYERS):
        if parts[1] in folders:
            return index
    return None


def _unplaced(module: str, path: Path) -> str:
    if module.count(".") == 1 and path.name != "__init__.py":
        return (
            f"{module}: a module at the package root; move it into the folder of its layer "
            f"(only {', '.join(ENTRY_MODULES)} live at the root)"
        )
    return f"{module}: folder {module.split('.')[1]!r} has no layer; add it to LAYERS in {__name__}"


def violations(root: Path) -> list[str]:
    """Every breach of the rules above, one line each (empty when the tree is clean)."""
    modules, imports = read_imports(root)
    problems = [_unplaced(m, p) for m, p in modules.items() if layer_of(m) is None]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        where = f"{imp.source}:{imp.line}"
        if not imp.target.startswith("piggyback"):
            if imp.in_function and not imp.commented:
                problems.append(
                    f"{where}: function-level import of {imp.target!r} needs a comment saying "
                    "why it is deferred (optional or heavy), or move it to the top"
                )
            continue
        if imp.in_function:
            problems.append(f"{where}: imports {imp.target} inside a function; import at the top")
        low, high = layer_of(imp.target), layer_of(imp.source)
        if low is not None and high is not None and low > high:
            problems.append(
                f"{where}: upward import of {imp.target} (layer {layer_name(low)!r}) from layer "
                f"{layer_name(high)!r}"
            )
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    problems += [f"import circle among: {', '.join(c[:-1])}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                circles.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_src_imports_only_downward_with_no_circle():
    problems = violations(SRC)
    assert not problems, "\n".join(problems)


def test_every_layer_folder_exists_and_every_folder_has_a_layer():
    package = SRC / "piggyback"
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    listed = {f for _, fs in LAYERS for f in fs}
    assert listed <= folders, f"LAYERS lists folders that do not exist: {listed - folders}"
    assert folders <= listed, f"folders without a layer: {folders - listed}"


def test_package_root_holds_only_the_entry_modules():
    root = {p.stem for p in (SRC / "piggyback").glob("*.py")}
    assert root == {"__init__", *ENTRY_MODULES}


def test_the_docs_draw_the_same_layers_in_the_same_order():
    page = (SRC.parent / "docs" / "development.md").read_text()
    layers = page.split("## Layers", 1)[1].split("\n## ", 1)[0]
    drawn = re.findall(r"^\d+\. \*\*(\w+)\*\*", layers, flags=re.M)
    assert drawn == [name for name, _ in LAYERS] + ["entry"]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "piggyback" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "__init__.py": "",
    "nn/__init__.py": "import torch\n",
    "formats/__init__.py": "from piggyback.nn import x\n",
    "methods/__init__.py": "from piggyback.formats import y\n",
    "models/__init__.py": "",
    "models/module.py": "from piggyback.methods import z\n",
    "train.py": "from piggyback.models.module import m\n",
}


def test_checker_accepts_a_clean_tree(tmp_path):
    assert violations(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"formats/__init__.py": "from piggyback.methods import z\n"}, "upward import"),
        ({"formats/__init__.py": "def f():\n    from piggyback.methods import z\n"}, "upward"),
        ({"formats/__init__.py": "def f():\n    from piggyback.nn import x\n"}, "inside a fun"),
        ({"formats/__init__.py": "if 0:\n    from piggyback.models.module import m\n"}, "upward"),
        ({"nn/__init__.py": "def f():\n    import wandb\n"}, "needs a comment"),
        ({"nn/a.py": "from . import b\n", "nn/b.py": "from piggyback.nn import a\n"}, "circle"),
        ({"newthing.py": ""}, "a module at the package root"),
        ({"newfolder/__init__.py": "", "newfolder/x.py": ""}, "has no layer"),
        ({"nn/x.py": "from piggyback.train import t\n"}, "upward import"),
    ],
)
def test_checker_finds_each_kind_of_breach(tmp_path, files, expected):
    problems = violations(_tree(tmp_path, {**CLEAN, **files}))
    assert any(expected in p for p in problems), problems


def test_commented_lazy_third_party_import_is_allowed(tmp_path):
    files = {**CLEAN, "nn/__init__.py": "def f():\n    import wandb  # optional: W&B only\n"}
    assert violations(_tree(tmp_path, files)) == []
