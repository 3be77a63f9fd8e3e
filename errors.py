"""The errors a user can cause. The entry reports each as one `error: ...` line and exits with
EXIT_USAGE; anything else is a bug and keeps its traceback."""

import re

EXIT_USAGE = 2
EXIT_NONFINITE = 3


class UsageError(ValueError):
    """A bad flag or flag combination."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(ValueError):
    """A data set that is missing, empty or unreadable. ``str(err)`` is always a single line.

    A DataLoader worker re-raises an exception in the main process as ``type(exc)(long_text)`` where the
    text holds the worker's traceback; the constructor recovers the original one-line message from it so
    the caller can still print one clean line. The full worker text is kept in ``.detail``.
    """

    def __init__(self, message: str = "") -> None:
        message = str(message)
        self.detail = message
        if message.startswith("Caught ") and "Traceback" in message:
            lines = [ln for ln in message.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else message
            # the traceback's last line is "module.ClassName: message"
            found = re.match(r"^[\w.]*(?:DataError|CorruptImageError): (.*)$", last)
            message = found.group(1) if found else last
        super().__init__(" ".join(message.split("\n")).strip())
