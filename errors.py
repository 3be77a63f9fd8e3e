"""The errors a user can cause. The entry reports each as one `error: ...` line and exits with
EXIT_USAGE; anything else is a bug and keeps its traceback."""

EXIT_USAGE = 2
EXIT_NONFINITE = 3


class UsageError(ValueError):
    """A bad flag or flag combination."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(ValueError):
    """A data set that is missing, empty or unreadable."""
