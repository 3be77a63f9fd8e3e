"""The summarizer's command line: ``python scripts/summarize.py OUT [OUT ...] [--tables ...] [--markdown FILE]
[--plots DIR] [--json FILE] [--no-flops]``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

from report import paper_results
from report.common import EXIT_USAGE, PROG, InputError, flag_name, show_paths_from, show_value, shown_path
from report.plots import draw_plots
from report.render import render_markdown, render_text
from report.runs import Run, left_out_lines, load_runs
from report.tables import build_table
from report.yours import build_yours

# ================================================================================================ main
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Print the ToE paper's tables from training runs (log.txt + args), "
                                       "and the runs that fit none of them as a table of their own.")
    p.add_argument("paths", nargs="+", metavar="OUT", help="run folders or roots holding them (searched recursively)")
    p.add_argument("--tables", default=",".join(paper_results.TABLES),
                   help=f"comma-separated table ids (default all: {','.join(paper_results.TABLES)})")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown to FILE")
    p.add_argument("--plots", metavar="DIR", help="draw Fig. 3 / Fig. 4 PNGs into DIR (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write the measured cells as JSON to FILE")
    p.add_argument("--no-flops", action="store_true",
                   help="take GFLOPs from the logged gflops_per_iter instead of recomputing with toe.flops")
    return p.parse_args(argv)


def check_folder(flag: str, path: str) -> None:
    """InputError unless ``path`` is a folder or can become one: neither it nor a folder above it is a file."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        where = "is a file" if here == os.path.abspath(path) else f"is under the file {here}"
        raise InputError(f"{flag} {path}: {where}, not a folder")


def _run_json(run: Run, use_flops: bool) -> Dict[str, Any]:
    metrics = {k: v for k, v in run.metrics("test_acc1", use_flops).items() if k != "curve"}
    left_out = [{"flag": flag_name(k), "run": show_value(have), "script": show_value(want)}
                for k, have, want in run.diffs]
    return {"run": run.path, "config": run.config, "fits": sorted(run.fits),
            "closest": f"table{run.closest.table}: {run.closest.name}" if run.closest else None,
            "differences": left_out, "mixed": run.mixed, **metrics}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry; returns the exit code."""
    try:
        args = parse_args(argv)
        tables = [t.strip() for t in args.tables.split(",") if t.strip()]
        unknown = [t for t in tables if t not in paper_results.TABLES]
        if unknown:
            raise InputError(f"--tables: unknown table {', '.join(unknown)} (known: {', '.join(paper_results.TABLES)})")
        if args.plots:
            check_folder("--plots", args.plots)
        runs = load_runs(args.paths)
    except InputError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE

    use_flops = not args.no_flops
    show_paths_from(os.path.commonpath([os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")
                                        for p in args.paths]))
    left_out = left_out_lines(runs)
    for line in left_out:
        print(line)
    built = [build_table(t, runs, use_flops) for t in tables]
    yours = build_yours(runs, use_flops)
    print(("\n" if left_out else "") + f"{len(runs)} run(s) under {', '.join(args.paths)}\n")
    for t in built + ([yours] if yours else []):
        print(render_text(t))
        print()
    used = {p for t in built for c in t["cells"].values() for p in c["runs"]}
    other = [r.path for r in runs if r.fits and r.path not in used]
    if other:
        print(f"{len(other)} run(s) fit a table script but no row of the tables shown: "
              + ", ".join(shown_path(p) for p in other))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(render_markdown(t) for t in built + ([yours] if yours else [])))
        print(f"markdown written to {args.markdown}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"tables": built + ([yours] if yours else []),
                       "runs": [_run_json(r, use_flops) for r in runs]}, f, indent=1, default=str)
    if args.plots:
        for path in draw_plots(runs, args.plots, use_flops):
            print(f"plot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
