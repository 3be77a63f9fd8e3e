"""Which runs may fill a paper table: the table scripts' commands, and how a run's flags compare with them.

Each table's script (``scripts/table<N>_*.sh``, run here with DRY_RUN=1, with TOE_COMPAT none and official)
lists the table's commands. A run *fits* a table when one of them trains what the run trained: the same data
set, input size, model and model kwargs, epochs, global batch, lr as trained, fine-tuning source and the value
of every other flag of main.py, the command's or main.py's default, apart from the flags in ``NOT_COMPARED``
(paths, seeds, the loader, how the run was launched or resumed), none of which can change a reported number.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from training import builders
from report import paper_results
from report.common import ROOT, warn
from report.runargs import finetune_from, global_batch, toe_on, world_size

# ============================================================================ the table scripts' commands
# Flags of main.py that cannot change a reported number (top-1, GFLOPs, GPU hours), so a run may differ in
# them and still fill a table. Each has its reason in tests/test_summarize.py, which checks the list flag by
# flag: every other flag of main.py is compared, against the command's value or main.py's default.
NOT_COMPARED = frozenset({
    "output_dir", "data_path", "token_label_data",  # where the same data is read and the run written
    "device", "world_size", "dist_url", "local_rank",  # how the processes were launched (their number: global batch)
    "num_workers", "pin_mem", "prefetch_factor", "persistent_workers",  # the loader: the same batches
    "dist_eval",  # exact: no padded duplicates
    "seed",  # a replicate: several seeds fill one cell as mean +- std
    "resume", "resume_changed_ok", "overwrite",  # how a run was continued or restarted (mixtures: log.txt's notice)
    "eval", "throughput", "print_freq", "skip_bad_images"})  # no training / logging / a run that stops without it
# Flags compared through what they amount to (the derived keys below), and main.py's derived args.json values.
_DERIVED_INPUTS = frozenset({"batch_size", "grad_accum_steps", "unscale_lr", "lr", "model_kwargs", "patch_size",
                             "finetune", "lr_scaled", "global_batch"})
_NOT_RECIPE = NOT_COMPARED | _DERIVED_INPUTS
# The value of a flag that an older args.json does not record (the flag did not exist, so it had this effect).
_ABSENT: Dict[str, Any] = {"toe_compat": "none", "toe_dense_loss": "merged", "curriculum": "none"}
# Derived keys: what several flags amount to.
GLOBAL_BATCH, TRAINED_LR, MODEL_KWARGS, FINETUNE_FROM = ("global batch", "lr as trained", "model kwargs",
                                                         "fine-tuned from")
_MISSING = object()


def _typed(token: str) -> Any:
    """A command-line value as main.py's parser would type it: int, float or str."""
    if re.fullmatch(r"[+-]?\d+", token):
        return int(token)
    try:
        return float(token)
    except ValueError:
        return token


def parse_flags(argv: Sequence[str]) -> Dict[str, Any]:
    """main.py's arguments -> {dest: value} by argparse's naming (``--drop-path`` -> drop_path, a bare
    ``--no-X`` -> X = False, a bare flag -> True, several values -> a list, ``--model-kwargs k=v`` -> dict).
    The last occurrence of a flag wins, as in argparse. ValueError on a token that is no flag or value."""
    values: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--"):
            raise ValueError(f"expected a --flag, got {flag!r}")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        name, raw = flag[2:], list(argv[i + 1:j])
        if name in ("model-kwargs", "teacher-model-kwargs"):
            values[name.replace("-", "_")] = {k: _typed(v) for k, _, v in (kv.partition("=") for kv in raw)}
        elif not raw:
            off = name.startswith("no-")
            values[(name[3:] if off else name).replace("-", "_")] = not off
        else:
            typed = [_typed(v) for v in raw]
            values[name.replace("-", "_")] = typed[0] if len(typed) == 1 else typed
        i = j
    return values


def parse_command(line: str) -> Tuple[int, Dict[str, Any]]:
    """A DRY_RUN line ``torchrun --nproc_per_node N --nnodes M ... main.py ARGS`` -> (processes, parsed ARGS)."""
    tokens = shlex.split(line)
    at = tokens.index("main.py")
    launcher = dict(zip(tokens[1:at:2], tokens[2:at:2]))
    world = int(launcher.get("--nproc_per_node", 1)) * int(launcher.get("--nnodes", 1))
    return world, parse_flags(tokens[at + 1:])


def script_commands(script: str, toe_compat: str = "none") -> List[Tuple[int, Dict[str, Any]]]:
    """The commands ``DRY_RUN=1 bash SCRIPT`` prints, parsed, with the published recipe (a clean environment:
    no CIFAR_*/LVVIT_* overrides). RuntimeError with the script's error line when it fails."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "DRY_RUN": "1", "DATA": "/data", "OUT": "/out", "NGPUS": "8", "TOE_COMPAT": toe_compat,
           "TORCHRUN": "torchrun", "PYTHON": sys.executable}
    res = subprocess.run(["bash", os.path.join(ROOT, script)], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=120)
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or [f"exit code {res.returncode}"]
        raise RuntimeError(f"DRY_RUN=1 bash {script} failed: {lines[-1]}")
    return [parse_command(line) for line in res.stdout.splitlines() if line.startswith("torchrun ")]


class Reference:
    """One command of a table's script: its table, run name (``table<N>/<name>``) and comparable recipe."""

    def __init__(self, table: str, name: str, recipe: Dict[str, Any]) -> None:
        self.table, self.name, self.recipe = table, name, recipe


def main_defaults() -> Dict[str, Any]:
    """main.py's default value of each of its flags: what a command that does not set a flag trains with."""
    if not _DEFAULTS:
        import main

        _DEFAULTS.update(vars(main.get_args_parser().parse_args([])))
    return _DEFAULTS


_DEFAULTS: Dict[str, Any] = {}


def recipe(values: Dict[str, Any], world: int, lr_is_trained: bool,
           finetune_from: Optional[str]) -> Dict[str, Any]:
    """The comparable view of a run's or a command's arguments: recipe flags (without ``_NOT_RECIPE``), with
    ToE's defaults filled in (r0 = r1 / 2, --toe-epochs = --epochs; no --toe-* key but toe_r1 = None when ToE
    is off) and the derived keys: global batch, lr as trained (``lr_is_trained``: the args of a run, whose lr
    main.py already scaled; else --lr x global batch / 512 unless --unscale-lr), model kwargs (with
    --patch-size) and the fine-tuning source."""
    out = {k: v for k, v in values.items() if k not in _NOT_RECIPE}
    if toe_on(values):
        r1 = float(values["toe_r1"])
        out["toe_r0"] = float(values["toe_r0"]) if values.get("toe_r0") is not None else r1 / 2
        out["toe_epochs"] = values.get("toe_epochs") or values.get("epochs", 300)
        if not values.get("token_label"):
            out.pop("toe_dense_loss", None)  # only the token-labeling loss reads it
    else:
        out = {k: v for k, v in out.items() if not k.startswith("toe_")}
        out["toe_r1"] = None
    batch = global_batch(values, world)
    lr = values.get("lr")
    if lr is not None and not lr_is_trained and not values.get("unscale_lr"):
        lr = float(lr) * batch / 512.0
    out.update({GLOBAL_BATCH: batch, TRAINED_LR: lr, FINETUNE_FROM: finetune_from,
                MODEL_KWARGS: builders.model_kwargs(values.get("model_kwargs"), values.get("patch_size"))})
    return out


def run_recipe(args: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`recipe` of a run's args. main.py's args.json records the lr it trained with as ``lr_scaled``
    (older ones wrote it into ``lr``, having scaled it in place)."""
    values = dict(args, lr=args["lr_scaled"]) if args.get("lr_scaled") is not None else args
    return recipe(values, world_size(args), lr_is_trained=True, finetune_from=finetune_from(args))


def _references_of(table: str, commands: List[Tuple[int, Dict[str, Any]]]) -> List[Reference]:
    by_dir = {values.get("output_dir"): values for _, values in commands}
    refs = []
    for world, values in commands:
        source = by_dir.get(os.path.dirname(str(values.get("finetune") or "")))
        ft = None if not values.get("finetune") else ("unknown" if source is None else
                                                       "toe" if toe_on(source) else "baseline")
        name = os.path.relpath(str(values.get("output_dir")), "/out")
        # a flag the command does not set trains with main.py's default
        unset = {k: v for k, v in main_defaults().items() if k not in values}
        refs.append(Reference(table, name, recipe({**values, **unset}, world, lr_is_trained=False,
                                                  finetune_from=ft)))
    return refs


_REFERENCES: Dict[str, List[Reference]] = {}


def references(table: str) -> List[Reference]:
    """Every command of ``table``'s script (with TOE_COMPAT none and official where the script reads it);
    [] when the script is missing (the table's notes say so) or fails (with a warning)."""
    if table not in _REFERENCES:
        script = paper_results.TABLES[table].get("script", "")
        commands: List[Tuple[int, Dict[str, Any]]] = []
        if script and os.path.isfile(os.path.join(ROOT, script)):  # else: no run can fill it (its notes say)
            try:
                seen = set()
                with open(os.path.join(ROOT, script), encoding="utf-8") as f:
                    reads_compat = "TOE_COMPAT" in f.read()  # else its commands do not depend on it
                for compat in ("none", "official") if reads_compat else ("none",):
                    for world, values in script_commands(script, compat):
                        if values.get("output_dir") not in seen:
                            seen.add(values.get("output_dir"))
                            commands.append((world, values))
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                warn(f"Table {table}: {e}; no run can fill it")
                commands = []
        _REFERENCES[table] = _references_of(table, commands)
    return _REFERENCES[table]


def same_value(have: Any, want: Any) -> bool:
    """Equal as main.py would use them: numbers to a relative 1e-6, lists and dicts item by item."""
    if isinstance(have, str) and not isinstance(want, str):
        have = _typed(have)
    if isinstance(want, str) and not isinstance(have, str):
        want = _typed(want)
    if have is None or want is None:
        return have is None and want is None
    if isinstance(have, bool) or isinstance(want, bool):
        return isinstance(have, bool) and isinstance(want, bool) and have == want
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(float(have), float(want), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(have) == len(want) and all(same_value(a, b) for a, b in zip(have, want))
    if isinstance(have, dict) and isinstance(want, dict):
        return have.keys() == want.keys() and all(same_value(have[k], want[k]) for k in have)
    return have == want


def differences(have: Dict[str, Any], want: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, the run's value, the command's value) for every recipe key of the command (its flags and main.py's
    defaults) on which the run differs. A key an older args.json lacks takes its ``_ABSENT`` value, or is not
    compared."""
    out = []
    for key, expected in want.items():
        value = have.get(key, _ABSENT.get(key, _MISSING))
        if value is _MISSING:
            continue
        if key == "data_set":
            value, expected = str(value).upper(), str(expected).upper()
        if not same_value(value, expected):
            out.append((key, value, expected))
    return out


