"""Errors a user can cause, each naming what is wrong and how to fix it.

The CLI prints any `MlraMegaError` as one line and exits with status 2; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class MlraMegaError(Exception):
    """Base of the errors the CLI reports in one line."""

    exit_status = 2


class ConfigError(MlraMegaError):
    """A configuration value, or a combination of values, that cannot work."""

    def __init__(self, field: str, problem: str, fix: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}"
        if fix:
            message += f" (fix: {fix})"
        super().__init__(message)


class DataError(MlraMegaError):
    """Input data that cannot be read or used (file, line and what to do)."""


class PeerLost(MlraMegaError):
    """Another rank of the job died or stopped answering; this one gives up (exit status 1)."""

    exit_status = 1
