"""A run's `log.txt`: one JSON object per line, one line per finished epoch.

The only reader and writer of the file. Rows that are not epochs (for example the
``{"resumed_with_changes": ..., "epoch": E}`` notice of a resume under changed flags) carry a
non-metric key and are kept apart by :func:`epoch_rows`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from runtime.files import atomic_write_text

# A row holding one of these keys is a notice, not an epoch's metrics.
NOTICE_KEYS = ("resumed_with_changes",)


def read_rows(path: str) -> List[Dict[str, Any]]:
    """Every JSON object of ``path`` in file order; unreadable lines (a torn last write) are skipped."""
    rows: List[Dict[str, Any]] = []
    if not os.path.isfile(path):
        return rows
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def is_notice(row: Dict[str, Any]) -> bool:
    return any(key in row for key in NOTICE_KEYS)


def epoch_rows(path: str) -> List[Dict[str, Any]]:
    """The metric rows of ``path`` sorted by epoch, the last one kept when an epoch appears twice."""
    by_epoch: Dict[int, Dict[str, Any]] = {}
    for row in read_rows(path):
        if isinstance(row.get("epoch"), int) and not is_notice(row):
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def truncate(path: str, keep_before_epoch: int) -> None:
    """Drop the rows of epochs >= ``keep_before_epoch`` (atomically), so a resumed run logs each epoch once."""
    if not os.path.isfile(path):
        return
    kept = [r for r in read_rows(path) if isinstance(r.get("epoch"), int) and r["epoch"] < keep_before_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append(path: str, row: Dict[str, Any]) -> None:
    """Append one row with a single write, flushed to disk before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
