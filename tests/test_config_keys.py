"""Config honesty: every key of every schema is read by code, or named below with the reason it stays.

"Read" (ast, no imports of the code): the key's last name appears as an attribute access (`cfg.train.lr`),
`.get("name")`, `getattr(x, "name")` or `["name"]` anywhere in src/groundlab outside config/, or in the
start-up code of config/ that consumes it (checks.py's cross-field rules, aliases.py); a TAO key pinned by
checks.RULES to the one value we implement (`model.two_stage_type: standard`) and an alias in
aliases.ALIASES count as read too. Matching by last name is loose (a key can pass on a namesake elsewhere),
so this test catches keys nothing reads at all: a removed reader shows up here, an invented key too."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

from groundlab.config.aliases import ALIASES
from groundlab.config.checks import RULES
from groundlab.config.store import SCHEMAS, RootConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "groundlab"
# config/ modules whose attribute reads consume keys at start-up (the schemas themselves never count)
CONSUMING_CONFIG_MODULES = {"checks.py", "aliases.py"}
GROUPS = {f.name for f in dataclasses.fields(RootConfig) if f.type in ("Any", typing.Any)}

# key -> why it stays although no code reads it. Keep it short; each entry must be a real, unread key.
ALLOWLIST: Dict[str, str] = {}


def _dataclass_in(tp) -> type:
    """The dataclass a field holds (itself, or the element of a List / Optional of one), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _keys(node: type, prefix: str) -> Iterator[str]:
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        if prefix == "" and f.name in GROUPS:
            continue  # the group nodes themselves (model, dataset, ...): their keys are listed per schema
        yield prefix + f.name
        inner = _dataclass_in(hints[f.name])
        if inner is not None:
            yield from _keys(inner, f"{prefix}{f.name}.")


def schema_keys() -> Dict[str, Set[str]]:
    """dotted key (`model.mask_thres`, `train.optim.lr`, `seed`) -> the schemas holding it."""
    out: Dict[str, Set[str]] = {}
    for group, name, node in SCHEMAS:
        for key in _keys(node, "" if group is None else f"{group}."):
            out.setdefault(key, set()).add(f"{group or 'root'}/{name}")
    return out


def _names_read(tree: ast.AST) -> Iterator[str]:
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
            yield n.attr
        elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str):
            yield n.slice.value
        elif isinstance(n, ast.Call) and n.args:
            func = n.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "select"):
                arg = n.args[0] if func.attr != "select" else (n.args[1] if len(n.args) > 1 else None)
            elif isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(n.args) > 1:
                arg = n.args[1]
            else:
                continue
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value.rsplit(".", 1)[-1]


def names_read() -> Dict[str, Set[str]]:
    """last name -> files (relative to src/groundlab) that read it."""
    out: Dict[str, Set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "config" and rel.name not in CONSUMING_CONFIG_MODULES:
            continue
        for name in _names_read(ast.parse(path.read_text(), str(path))):
            out.setdefault(name, set()).add(str(rel))
    return out


def consumed_at_start_up() -> Set[str]:
    """Keys pinned by a single-choice rule and aliases (read by check_config by their dotted path)."""
    pinned = {key for key, rule in RULES if len(rule.choices) == 1}
    return pinned | {alias for table in ALIASES.values() for alias in table}


KEYS = schema_keys()
READ = names_read()
STARTUP = consumed_at_start_up()


def _unread() -> Tuple[str, ...]:
    return tuple(sorted(k for k in KEYS if k.rsplit(".", 1)[-1] not in READ and k not in STARTUP))


def test_the_walk_sees_every_group_and_nested_keys():
    assert {k.split(".")[0] for k in KEYS if "." in k} == GROUPS
    for key in ("seed", "model.mask_thres", "train.optim.lr", "dataset.augmentation.scales",
                "dataset.train_data_sources.label_map", "dataset.infer_data_sources.captions", "action.split"):
        assert key in KEYS, key


def test_the_reader_sees_attribute_get_and_subscript_reads():
    src = "def f(cfg, d):\n    return cfg.train.lr, d.get('wd'), d['crf_zeta'], getattr(cfg, 'num_wave')\n"
    assert {"train", "lr", "wd", "crf_zeta", "num_wave"} <= set(_names_read(ast.parse(src)))
    assert "lr" not in set(_names_read(ast.parse("def f(cfg):\n    cfg.lr = 1\n")))  # a write is no read


def test_every_schema_key_is_read_by_code():
    missing = [f"{k} ({', '.join(sorted(KEYS[k]))})" for k in _unread() if k not in ALLOWLIST]
    assert not missing, ("schema keys no code under src/groundlab reads: remove them, read them, or pin a TAO "
                         "key to the value we implement in config/checks.py RULES:\n  " + "\n  ".join(missing))


def test_allowlist_entries_are_real_unread_keys():
    unread = _unread()
    for key, reason in ALLOWLIST.items():
        assert key in KEYS, f"{key} is allowlisted but no schema has it"
        assert key in unread, f"{key} is allowlisted but code reads it: drop it from the allowlist"
        assert reason.strip(), f"{key} needs a reason"


def test_start_up_keys_exist():
    """Pinned and aliased keys name real schema keys (a rule or alias for a removed key is dead)."""
    for key in sorted(STARTUP | {k for k, _ in RULES}):
        assert key in KEYS, f"config/checks.py or aliases.py names {key}, which no schema has"
