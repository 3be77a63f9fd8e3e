#!/usr/bin/env python
"""Turn finished (or running) training runs into the ToE paper's tables, next to the paper's numbers, and
every other run into a table of its own ("Your runs").

    python scripts/summarize.py OUT [OUT ...] [--tables 2,3,4,5,6,7,8,9] [--markdown FILE] [--plots DIR]
                                [--json FILE] [--no-flops]

Every folder under the given paths that holds a ``log.txt`` (main.py's JSON lines, read with
``runlog.epoch_rows``) is a run, with its arguments from ``args.json`` (else its checkpoint). A run fills
the rows of a paper table when one of the table script's commands trains what it trained (``report.recipes``);
the others go to "Your runs", each ToE run next to the baseline run with the same arguments apart from the
--toe-* flags (``report.yours``). Per row: best top-1, GFLOPs per training iteration from ``toe.flops``, GPU
hours, and the theoretical and practical speed-ups (``report.tables``). ``--plots DIR`` draws Fig. 3 and
Fig. 4 (``report.plots``). Bad input: one ``error:`` line on stderr, exit 2. The code lives in ``report/``.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from report.cli import main  # noqa: E402
# tests/test_scripts.py reads a script's flags as summarize does and compares values with its rule
from report.recipes import parse_flags, same_value as _same  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
