"""Errors a user fixes in their own input: data, config, files. Each names where the problem is (file and line,
image, config key); run.py prints the message as one sentence and exits with status 2, without a traceback
(GROUNDLAB_TRACEBACK=1 shows it)."""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the config names does not exist; the message names the key or the path."""


class DataError(UserError, ValueError):
    """Bad or missing input data. `where` is 'file:line', 'file', or an image name."""

    def __init__(self, message: str, where: Optional[str] = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class PromptOverflowError(DataError):
    """A prompt's positive phrases alone need more than model.max_text_len tokens."""
