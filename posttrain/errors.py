"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a recipe, a data file, a run directory. The message names the problem and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, whatever the caller wrote
