"""The error types of ``moe_mpi``, and which of them mean bad input.

User errors are :class:`UserError` and the exception types that mean bad
input (:data:`USER_ERRORS`: ``ValueError`` and so ``json.JSONDecodeError``
and :class:`CheckpointError`, ``FileNotFoundError`` and so
:class:`ModelNotFoundError`, and a few other ``OSError`` types of unreadable
input files). Commands report them as one line without a traceback; any
other exception is a bug (see :mod:`moe_mpi.runner`, which does the
reporting on every rank).

This module imports nothing from the package, so that every module can
raise these types without an import cycle.
"""

from __future__ import annotations

import json

__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "CollectiveError",
    "ModelNotFoundError",
    "UserError",
    "is_user_error",
]


class UserError(Exception):
    """Bad input: reported as one clear line, without a traceback."""


class CollectiveError(UserError):
    """A user error that every rank raises at the same point of the program.

    Raise it only where all ranks provably reach the same conclusion, e.g.
    right after a collective that gave every rank the same data. Outside a
    :func:`moe_mpi.runner.collective_phase` it is then reported once by
    rank 0 and all ranks exit with code 1, without ``MPI_Abort``.
    """


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed."""


class ModelNotFoundError(FileNotFoundError):
    """A model path or repo that cannot be found or fetched."""


#: Exception types that mean bad input. Listed explicitly (most are
#: subclasses of ValueError or FileNotFoundError) so that the contract is
#: visible in one place.
USER_ERRORS = (
    UserError,
    ValueError,
    json.JSONDecodeError,
    CheckpointError,
    FileNotFoundError,
    ModelNotFoundError,
    # Input files that exist but cannot be read as files.
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` means bad input rather than a bug."""
    return isinstance(exc, USER_ERRORS)
