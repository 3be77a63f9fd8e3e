"""What every part of the summarizer shares: its name in messages, the bad-input error, and how flags,
values and run folders are shown."""
from __future__ import annotations

import os
import sys
from typing import Any, List, Set

PROG = "summarize.py"
EXIT_USAGE = 2
YOURS = "Your runs"
# The repository root: the table scripts' paths in paper_results are relative to it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InputError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# main.py flags spelled with underscores, as DeiT spells them
_UNDERSCORED = frozenset({"output_dir", "num_workers", "start_epoch", "world_size", "dist_url", "local_rank"})


def flag_name(key: str) -> str:
    """``drop_path`` -> ``--drop-path`` (``start_epoch`` -> ``--start_epoch``); a derived key ("global batch")
    stays as it is."""
    if " " in key:
        return key
    return "--" + (key if key in _UNDERSCORED else key.replace("_", "-"))


def show_value(value: Any) -> str:
    """A flag value as a person would type it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return " ".join(f"{k}={show_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return " ".join(show_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


WARNED: Set[str] = set()  # warnings already given once
_SHOWN_FROM = [os.getcwd()]  # run folders are shown relative to this (the CLI sets the paths' common folder)


def show_paths_from(folder: str) -> None:
    _SHOWN_FROM[0] = folder


def shown_path(path: str) -> str:
    """A run folder as the output names it: relative to the given paths' common folder."""
    rel = os.path.relpath(path, _SHOWN_FROM[0])
    return os.path.basename(path) if rel == "." else rel


def shown_paths(paths: List[str], limit: int = 6) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
