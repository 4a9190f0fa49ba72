"""The project's own errors: problems with the user's input that the user can fix.

Every error modnet raises for bad input derives from ``ModnetError``; the ``modnet``
command prints those as one line and exits with code 2, while any other exception
(a genuine bug, a torch failure) keeps its traceback. Each subclass also derives
from the built-in exception a Python caller would expect (``ValueError`` for bad
values, ``KeyError`` for unknown names), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class ModnetError(Exception):
    """Base of every error modnet raises for input the user can fix.

    The message names the problem and the fix in one line.
    """


class ConfigError(ModnetError, ValueError):
    """An option or argument is out of range, of the wrong type, or inconsistent."""


class UnknownTaskError(ModnetError, KeyError):
    """A task name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


class RunDirError(ModnetError, ValueError):
    """A run directory cannot be used for what was asked (not a run, locked, unfinished)."""


class CheckpointError(ModnetError, ValueError):
    """A checkpoint is missing, corrupted, or does not match what it is loaded into."""


class DivergenceError(ModnetError, FloatingPointError):
    """Training diverged: a non-finite or exploding loss, or non-finite weights or statistics."""


class DiskFullError(ModnetError, OSError):
    """A write failed because the device is full; the message names the path."""

    def __str__(self) -> str:  # OSError would prefix "[Errno 28]" once errno is set
        return str(self.args[0]) if self.args else ""
