"""Errors that diffora raises on purpose.

Every problem caused by the user's input (a bad option, a file that cannot be read, a module name that does not
exist) is a :class:`DiffoRAError`. The CLI turns it into a one-line message and exit code 2; anything else is an
internal error (exit code 1).
"""


class DiffoRAError(Exception):
    """A problem with the user's input or request, with a message that says how to fix it."""


class ConfigError(DiffoRAError, ValueError):
    """An option has an invalid value."""


class DataError(DiffoRAError, ValueError):
    """A data file is missing, empty or malformed."""


class ModelError(DiffoRAError, ValueError):
    """A model cannot be loaded or has nothing diffora can adapt."""


class SearchStateError(DiffoRAError, RuntimeError):
    """An operation was requested in the wrong phase (e.g. discretising before any gate step ran)."""


class TrainingError(DiffoRAError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class ResourceError(DiffoRAError, RuntimeError):
    """The machine ran out of a resource (accelerator memory) mid-run. The CLI exits with 1, not 2: the input was
    valid, and the checkpoints written so far are kept for ``--resume``."""

    exit_code = 1
