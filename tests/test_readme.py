"""The README and docs/ cannot drift from the code: every command they show composes.

Every ``python train.py`` / ``python evaluate.py`` line in a fenced ``bash`` block of README.md
and docs/*.md is composed against ``conf/`` (``train.yaml`` / ``eval.yaml``) with Hydra's
``compose``, and every mandatory value (``???``) must be given. Composition reads no data, so a
path that exists only on the machine that ran it is fine. How a line is read:

- a trailing ``\\`` joins the next line (as in bash); ``# ...`` comments are dropped;
- ``NAME="..."`` earlier in the same block defines ``$NAME`` / ``${NAME}``; any other unescaped
  ``$`` fails (write a Hydra interpolation as ``\\${hydra.job.num}``);
- leading ``VAR=value`` environment assignments are dropped;
- with ``-m`` / ``--multirun``, each value of each sweep (``a=1,2``, ``range(...)``) is composed
  once, the other sweeps at their first value; without it a sweep fails, as in Hydra;
- no placeholders: write ``data.root=/path/to/images``, never ``data.root=<dir>``.

``python benchmarks/...`` and ``python -m ...`` lines are not composed. The ``import`` lines of
every fenced ``python`` block must import, and the README stays at most 350 lines.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig

from piggyback.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 350

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SCRIPTS = {"train.py": "train", "evaluate.py": "eval"}
ASSIGNMENT = re.compile(r"^(\w+)=")
SHELL_VAR = re.compile(r"(?<!\\)\$(?:\{([^}]*)\}|(\w+))")


@dataclass(frozen=True)
class Command:
    where: str  # page:line
    text: str  # the line as the shell sees it, continuations joined
    config_name: str
    overrides: tuple[str, ...]
    multirun: bool


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line of the block's first line, body) for each fenced block in one of ``languages``."""
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) in languages
    ]


def _expand(line: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name not in variables:
            raise ValueError(f"${name} is not set in this block (escape a Hydra ${{...}} as \\$)")
        return variables[name]

    return SHELL_VAR.sub(sub, line)


def commands_in(block: str, where: str, first_line: int) -> list[Command]:
    """The train.py / evaluate.py commands of one bash block, shell variables expanded."""
    found, variables = [], {}
    offset = 0
    for logical in block.replace("\\\n", "\x00").split("\n"):
        lineno = first_line + offset
        offset += logical.count("\x00") + 1
        line = logical.replace("\x00", "").strip()
        if not line or line.startswith("#"):
            continue
        tokens = shlex.split(_expand(line, variables), comments=True)
        if len(tokens) == 1 and ASSIGNMENT.match(tokens[0]):  # NAME="..."
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        while tokens and ASSIGNMENT.match(tokens[0]):  # VAR=value python ...
            tokens.pop(0)
        if len(tokens) < 2 or tokens[0] != "python" or tokens[1] not in SCRIPTS:
            continue
        args = tokens[2:]
        multirun = any(a in ("-m", "--multirun") for a in args)
        overrides = tuple(a for a in args if a not in ("-m", "--multirun"))
        found.append(Command(f"{where}:{lineno}", line, SCRIPTS[tokens[1]], overrides, multirun))
    return found


def page_commands(page: Path) -> list[Command]:
    where = str(page.relative_to(REPO))
    return [
        command
        for first_line, body in fenced_blocks(page.read_text(), ("bash", "sh", "shell", "console"))
        for command in commands_in(body, where, first_line)
    ]


def variants(command: Command) -> list[list[str]]:
    """The override lists to compose: one, or for a multirun one per value of each sweep."""
    if not command.multirun:
        return [list(command.overrides)]
    parsed = OverridesParser.create().parse_overrides(list(command.overrides))
    first, sweeps = [], []
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            values = [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
            first.append(values[0])
            sweeps.append((i, values[1:]))
        else:
            first.append(override.input_line)
    out = [first]
    for i, others in sweeps:
        for value in others:
            out.append([*first[:i], value, *first[i + 1 :]])
    return out


def missing_values(cfg, path: str = "") -> list[str]:
    """Keys left at ``???``, found without resolving any interpolation."""
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    out = []
    for key in keys:
        node = cfg._get_node(key)
        name = f"{path}.{key}" if path else str(key)
        if node._is_missing():
            out.append(name)
        elif isinstance(node, DictConfig | ListConfig) and not node._is_interpolation():
            out += missing_values(node, name)
    return out


def compose_problems(command: Command) -> list[str]:
    """Why ``command`` does not compose, one line per failing variant; [] when it does."""
    try:
        override_lists = variants(command)
    except Exception as e:  # noqa: BLE001 - the parser's message is the report
        return [f"{type(e).__name__}: {e}"]
    problems = []
    for overrides in override_lists:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(config_name=command.config_name, overrides=overrides)
        except Exception as e:  # noqa: BLE001 - Hydra's message is the report
            problems.append(f"{overrides}: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        finally:
            GlobalHydra.instance().clear()
        if missing := missing_values(cfg):
            problems.append(f"{overrides}: mandatory values not given: {missing}")
    return problems


def parse(text: str, where: str = "test") -> Command:
    (command,) = commands_in(text, where, 1)
    return command


ALL_COMMANDS = [c for page in PAGES for c in page_commands(page)]


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move depth to docs/"


def test_the_readme_shows_commands_to_compose():
    readme = [c for c in ALL_COMMANDS if c.where.startswith("README.md")]
    assert any(c.config_name == "train" for c in readme)
    assert any(c.config_name == "eval" for c in readme)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_every_documented_command_composes(command):
    problems = compose_problems(command)
    assert not problems, f"{command.where}: {command.text}\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python train.py nosuch=1", "Could not override 'nosuch'"),
        ("python train.py nosuch_group=x", "Could not override"),
        ("python train.py method=nosuch", "method/nosuch"),
        ("python train.py method=piggyback,ksm", "Ambiguous value"),  # a sweep needs -m
        ("python train.py -m method=piggyback,nosuch", "method/nosuch"),  # every value counts
        ("python train.py data=imagefolder data.num_classes=3", "data.root"),  # ??? left
        ("python train.py data.root=<dir>", "OverrideParseException"),  # a placeholder
        ("python evaluate.py method=piggyback", "Could not override 'method'"),
    ],
)
def test_a_command_that_does_not_compose_fails(text, expected):
    problems = compose_problems(parse(text))
    assert any(expected in p for p in problems), problems


def test_shell_variables_continuations_and_comments():
    block = (
        'C="backbone=efficientnet_lite0 \\\n   trainer.max_epochs=4"\n'
        "PIGGYBACK_DATA=/data python train.py -m $C method.lr_scale=1,3 \\\n"
        "  hydra.sweep.subdir=pb_\\${hydra.job.num}   # a comment\n"
        "python benchmarks/run.py --quick\n"
    )
    (command,) = commands_in(block, "test", 1)
    assert command.overrides == (
        "backbone=efficientnet_lite0",
        "trainer.max_epochs=4",
        "method.lr_scale=1,3",
        "hydra.sweep.subdir=pb_${hydra.job.num}",
    )
    assert command.multirun and command.where == "test:3"
    assert [v[2] for v in variants(command)] == ["method.lr_scale=1", "method.lr_scale=3"]
    assert not compose_problems(command)
    with pytest.raises(ValueError, match=r"\$UNSET is not set"):
        commands_in("python train.py data.root=$UNSET\n", "test", 1)


def _imports(code: str) -> list[tuple[str, list[str]]]:
    return [
        (node.module, [a.name for a in node.names])
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("piggyback")
    ]


PYTHON_IMPORTS = [
    (f"{page.relative_to(REPO)}:{line}", module, names)
    for page in PAGES
    for line, body in fenced_blocks(page.read_text(), ("python",))
    for module, names in _imports(body)
]


@pytest.mark.parametrize(
    ("where", "module", "names"), PYTHON_IMPORTS, ids=[f"{w}-{m}" for w, m, _ in PYTHON_IMPORTS]
)
def test_every_documented_import_imports(where, module, names):
    imported = importlib.import_module(module)
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"{where}: {module} has no {missing}"
