"""Every checkpoint load of ours, and every one we ask Lightning for, runs with weights_only=True (a checkpoint
from elsewhere cannot run code): read from the source with ast, so a new call without it fails here."""

from __future__ import annotations

import ast
import os

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "groundlab")
LOADERS = {"load", "fit", "validate", "test", "predict"}  # torch.load and the Trainer calls that take ckpt_path


def _calls():
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                        owner = node.func.value
                        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                        if (node.func.attr == "load" and name == "torch") or (
                                node.func.attr in LOADERS - {"load"} and name == "trainer"):
                            yield f"{os.path.relpath(path, SRC)}:{node.lineno}", node


def test_every_load_is_weights_only():
    found = list(_calls())
    assert len(found) >= 4  # the checker sees the calls (checkpoint, weights, trainer.fit, trainer.validate)
    unsafe = [where for where, node in found
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)]
    assert unsafe == []
