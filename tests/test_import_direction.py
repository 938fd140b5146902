"""Dependencies point one way (DESIGN.md §2): every `groundlab` import of every module, read with ast (lazy
imports inside functions included), must go to a package allowed below it, and modules never import each
other in a circle."""

from __future__ import annotations

import ast
import os
from typing import Dict, Set

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "groundlab")

LEAVES = {"errors", "ops", "text", "config", "io"}
# package -> the packages it may import (besides itself). Leaves import nothing but `errors`.
ALLOWED: Dict[str, Set[str]] = {
    "errors": set(),
    "ops": {"errors"},
    "text": {"errors"},
    "config": {"errors"},
    "io": {"errors", "ops"},  # remote URIs -> local cache files: data, models, predict and the runner read through it
    "data": LEAVES,
    "models": LEAVES,
    "eval": LEAVES | {"data"},
    "predict": LEAVES | {"data", "models"},
    "deploy": LEAVES | {"data", "models", "predict"},
    "engine": LEAVES | {"data", "models", "eval", "predict"},
    # recipes: a multi-step action (autolabel) runs other (model, action) pairs through the one table
    "actions": LEAVES | {"data", "models", "eval", "predict", "deploy", "engine", "run_record", "recipes"},
    "run_record": LEAVES,
    "sweep_report": LEAVES,
    "recipes": LEAVES,
    "runner": LEAVES | {"recipes", "run_record", "console"},
    "console": set(),
    "__init__": set(),
}


def _modules() -> Dict[str, Set[str]]:
    """module name -> groundlab modules it imports."""
    out: Dict[str, Set[str]] = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
            name = "groundlab." + rel.removesuffix(".__init__") if rel != "__init__" else "groundlab"
            targets = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("groundlab"):
                    targets.add(node.module)
                    targets.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
                elif isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names if a.name.startswith("groundlab"))
            out[name] = targets
    return {m: {t for t in ts if t in out} for m, ts in out.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()


def test_every_package_is_placed():
    assert {_package(m) for m in MODULES} <= set(ALLOWED), "a new package needs its place in ALLOWED"


def test_imports_point_down_the_order():
    wrong = sorted(f"{m} -> {t}" for m, ts in MODULES.items() for t in ts
                   if _package(t) != _package(m) and _package(t) not in ALLOWED[_package(m)])
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_only_the_engine_imports_lightning():
    users = set()
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    if any(n == "lightning" or n.startswith("lightning.") for n in names):
                        users.add(os.path.relpath(path, SRC).split(os.sep)[0])
    assert users == {"engine"}


def test_no_import_cycles_between_modules():
    state: Dict[str, int] = {}
    stack = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(MODULES[m]):
            if t == m or m.startswith(t + "."):  # a package's own __init__ while importing its module
                continue
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_wrong_edge(tmp_path):
    """The walker finds lazy imports inside functions (what the order test relies on)."""
    src = "def f():\n    from groundlab.engine.trainer import fit\n"
    tree = ast.parse(src)
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["groundlab.engine.trainer"]
    assert "engine" not in ALLOWED["models"]
