"""Errors of the data layer. Each names where the problem is (file and line, image, config key),
so a user can fix the input without reading a traceback."""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad or missing input data. `where` is 'file:line', 'file', or an image name."""

    def __init__(self, message: str, where: Optional[str] = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class PromptOverflowError(DataError):
    """A prompt's positive phrases alone need more than model.max_text_len tokens."""
