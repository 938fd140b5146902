"""Errors a user fixes in their own input: data, config, files. Each names where the problem is (file and line,
image, config key); run.py prints the message as one sentence and exits with status 2, without a traceback
(GROUNDLAB_TRACEBACK=1 shows it)."""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


def user_message(err: UserError) -> str:
    """The sentence of `err`; an error raised in a data-loader worker arrives with the worker's traceback in its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line is the
    sentence."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the config names does not exist; the message names the key or the path."""


class DataError(UserError, ValueError):
    """Bad or missing input data. `where` is 'file:line', 'file', or an image name."""

    def __init__(self, message: str, where: Optional[str] = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class PromptOverflowError(DataError):
    """A prompt's positive phrases alone need more than model.max_text_len tokens."""
