"""Reading json and jsonl annotation files so that every failure names the file (and line)."""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Tuple

from groundlab.errors import DataError


def load_json(path: str, what: str = "annotation file") -> Any:
    """The parsed file; a missing file or bad JSON is a DataError naming `path` and the line."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} not found", path) from None
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg}, line {err.lineno})", path) from None


def iter_jsonl(path: str, what: str = "annotation file") -> Iterator[Tuple[int, str, Dict[str, Any]]]:
    """(line number, where = "path:line", object) per non-blank line; each line must hold one JSON object."""
    try:
        f = open(path)
    except FileNotFoundError:
        raise DataError(f"{what} not found", path) from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg}, column {err.colno})", where) from None
            if not isinstance(obj, dict):
                raise DataError("a line must hold one JSON object", where)
            yield lineno, where, obj
