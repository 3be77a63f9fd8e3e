"""The errors a user can cause. The entry reports each as one `error: ...` line and exits with
EXIT_USAGE; anything else is a bug and keeps its traceback."""

import os
import re
import sys

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT, also used for SIGTERM so a rerun knows it was a stop


def launcher_rank() -> int:
    """The launcher's rank for this process (readable before any process group exists)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                return 0
    return 0


def fail(message: str, code: int, prefix: str = "error: ") -> int:
    """Print ``prefix + message`` as one line on stderr (rank 0 only) and return ``code``."""
    if launcher_rank() == 0:
        print(prefix + " ".join(str(message).split()), file=sys.stderr, flush=True)
    return code


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
