"""The package's architecture, read from its source: no import cycle between modules or between
subpackages; evaluation's judge and the pictures load no generation, training or Lightning code; no
module reads the repository's experiments/ folder (the package ships its own recipe in configs/)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unimodal

PACKAGE = Path(unimodal.__file__).resolve().parent
ROOT = PACKAGE.name  # "unimodal"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str | None = None) -> set[str]:
    """The package's modules that module `name` imports anywhere in its source (inside functions too):
    `import a.b`, `from a.b import c` (c a module or a name in a.b) and relative imports, each resolved
    to the deepest module of the package it names."""
    path = MODULES.get(name)
    package = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `level - 1` steps above this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def subpackage(name: str) -> str | None:
    """The first component below the package (`generation` for unimodal.generation.fast.decode, `viz` for
    unimodal.viz); None for the package's own __init__ and __main__, which sit above every subpackage."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None
    return parts[1]


MODULE_GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_import_graph_is_read_from_every_kind_of_import():
    """The reader sees what the architecture tests rely on (or they would pass by seeing nothing)."""
    assert len(MODULES) > 30 and "unimodal.generation.fast.host" in MODULES
    assert "unimodal.generation.sampling" in MODULE_GRAPH["unimodal.generation.bundle"]  # from a.b import name
    assert "unimodal.training.fit" in MODULE_GRAPH["unimodal.cli.demo"]  # inside a function
    assert "unimodal.cli.main" in MODULE_GRAPH["unimodal.__main__"]
    source = "from .sampling import draw\nfrom . import bundle\nfrom ..lm import vocab\nimport unimodal.viz\n"
    assert imports_of("unimodal.generation.new", source) == {  # a new module of generation/ with relative imports
        "unimodal.generation.sampling", "unimodal.generation", "unimodal.generation.bundle", "unimodal.lm",
        "unimodal.lm.vocab", "unimodal.viz",
    }  # fmt: skip


def test_no_import_cycle_between_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the finder finds one
    cycle = find_cycle(MODULE_GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for name, imported in MODULE_GRAPH.items():
        src = subpackage(name)
        if src is None:
            continue
        graph.setdefault(src, set())
        graph[src] |= {dst for dst in map(subpackage, imported) if dst is not None and dst != src}
    assert {"data", "tokenizers", "lm", "generation", "training", "evaluation", "cli", "bench", "viz"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "subpackages import each other: " + " -> ".join(cycle)


_LOADED = """
import importlib, json, sys
heavy = ("unimodal.generation", "unimodal.training", "lightning", "pytorch_lightning", "lightning_fabric")
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy)))
print(json.dumps(loaded))
"""


@pytest.mark.slow  # a fresh process: imports torch
def test_the_judge_and_the_pictures_load_no_generation_training_or_lightning():
    """Evaluating images needs neither the sampler nor the trainer: a fresh process imports the judge,
    then the pictures, and neither brings them in."""
    targets = ["unimodal.evaluation.judge", "unimodal.viz"]
    run = subprocess.run([sys.executable, "-c", _LOADED, *targets], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout) == {name: [] for name in targets}


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)
    }


def test_no_module_reads_the_repositorys_experiments_folder():
    """Only an installed package's own files are there for it to read: a string in code (not a docstring,
    not a sentence such as a --help text) that is a path through `experiments` would break outside a clone."""
    readers = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                text = node.value
                if not re.search(r"\s", text) and "experiments" in re.split(r"[/\\]", text):
                    readers.append(f"{name}:{node.lineno}: {text!r}")
    assert not readers, "modules that read experiments/: " + "; ".join(readers)
