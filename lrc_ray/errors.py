"""User-facing errors.

A `UserInputError` means the user gave something we cannot work with (a bad file, a bad
setting). The CLI prints its message as one line and exits non-zero, without a traceback.
Messages name the file or field and say what was expected.
"""


class UserInputError(ValueError):
    """Bad input from the user: printed as one line by the CLI, never with a traceback."""


class DataValidationError(UserInputError):
    """A data set on disk does not match what lrc_ray expects (names the offending file)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); printed as one line by the CLI."""
