#!/usr/bin/env python
"""Turn finished (or running) training runs into the ToE paper's tables, next to the paper's numbers, and
every other run into a table of its own ("Your runs").

    python scripts/summarize.py OUT [OUT ...] [--tables 2,3,5,6,7,8,9] [--markdown FILE] [--plots DIR]
                                [--json FILE] [--no-flops]

Every folder under the given paths that holds a ``log.txt`` (main.py's JSON lines, read with
``runlog.epoch_rows``) is a run. Its arguments come from ``args.json`` when present, else from the ``args``
entry of its ``checkpoint.pth`` (``best_checkpoint.pth``), read with ``torch.load(weights_only=True)``.

Which runs may fill a paper table. Each table's script (``scripts/table<N>_*.sh``, run here with DRY_RUN=1,
with TOE_COMPAT none and official) lists the table's commands. A run *fits* a table when one of them trains
what the run trained: the same data set, input size, model and model kwargs, epochs, global batch, lr as
trained, fine-tuning source and the value of every other recipe flag the command sets, and none of the
switches no script gives (see ``_OFF``). Paths, seeds, loader, precision and logging flags do not count. A
fitting run then fills the table rows whose configuration it matches (model, data set, token labeling,
fine-tuning source and every ToE setting, see :func:`run_config`; folder names play no part). The first
lines of the output name every run that fits no table and, one line per reason, how it differs from the
closest command. Those runs go to "Your runs": each ToE run next to the baseline run whose arguments equal
its own apart from the ``--toe-*`` flags and the output folder.

Per row it reports, measured | paper:
  * Top-1: the best validation top-1 over the logged epochs (DeiT's "max accuracy"; the EMA model's for
    Table 3, as the paper reports LV-ViT with EMA), the mean +- std when several runs match (seeds), and the
    difference to the row group's baseline where the paper prints one (Tables 2, 3, 5);
  * GFLOPs per training iteration: ``toe.flops.gflops_per_iteration`` for the run's model, input size, global
    batch and ToE schedule (thop forward x 3 x batch, averaged over the stages as the paper does), with the
    theoretical speed-up over the baseline. Marked ``[log]`` where the number is instead the mean of the
    ``gflops_per_iter`` values main.py logged: with ``--no-flops``, for a model toe.flops cannot count, and for
    an input-size curriculum;
  * total GPU hours: the sum over epochs of the training wall time (``epoch_time``) x the number of processes
    (``world_size``), and the practical acceleration = baseline GPU hours / GPU hours.
A run that has not finished all its epochs is marked with ``*``. Where runs of both ``--toe-compat`` variants
fill a row, it is printed twice; the paper's numbers stand next to the official-code row (Table 9 always
prints both, as its script trains both).

``--plots DIR`` draws (matplotlib, optional) Fig. 3 (validation top-1 per epoch, baseline vs ToE, one PNG per
model) and Fig. 4 (top-1 against practical and theoretical acceleration over r1, one PNG per model), and the
same two for each group of "Your runs" that has a baseline and a ToE run.
Bad input (a missing path, no log.txt anywhere under a path, no readable run) -> one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import builders  # noqa: E402
import paper_results  # noqa: E402
import runlog  # noqa: E402
from errors import UsageError  # noqa: E402

PROG = "summarize.py"
EXIT_USAGE = 2
YOURS = "Your runs"


class InputError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# =============================================================================================== reading
_ARGS_CACHE: Dict[str, Optional[Dict[str, Any]]] = {}


def _checkpoint_args(path: str) -> Optional[Dict[str, Any]]:
    """The plain-dict ``args`` saved in a main.py checkpoint, or None if the file has none / is unreadable."""
    if path in _ARGS_CACHE:
        return _ARGS_CACHE[path]
    args = None
    if os.path.isfile(path):
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip checkpoint (mmap needs one), unsafe content, truncated file
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                ckpt = None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict):
            args = dict(ckpt["args"])
    _ARGS_CACHE[path] = args
    return args


def load_args(run_dir: str) -> Optional[Dict[str, Any]]:
    """A run's arguments: run_dir/args.json, else the checkpoint's saved args; None when neither exists."""
    path = os.path.join(run_dir, "args.json")
    if os.path.isfile(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                args = json.load(f)
            if isinstance(args, dict):
                return args
        except (OSError, json.JSONDecodeError):
            pass
    for name in ("checkpoint.pth", "best_checkpoint.pth"):
        args = _checkpoint_args(os.path.join(run_dir, name))
        if args is not None:
            return args
    return None


def find_runs(paths: Sequence[str]) -> List[str]:
    """Every folder holding a log.txt under ``paths`` (deduplicated, sorted). InputError on a missing path or a
    path with no log.txt under it."""
    found: List[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f"no such file or directory: {path}")
        if os.path.isfile(path):
            if os.path.basename(path) != "log.txt":
                raise InputError(f"not a run folder or log.txt: {path}")
            here = [os.path.dirname(os.path.abspath(path))]
        else:
            here = [os.path.abspath(d) for d, _, files in os.walk(path) if "log.txt" in files]
        if not here:
            raise InputError(f"no log.txt under {path}")
        found.extend(here)
    return sorted(set(os.path.realpath(p) for p in found))


# ======================================================================================= configuration
_NB_CLASSES = {"IMNET": 1000, "CIFAR10": 10, "CIFAR100": 100, "INAT18": 8142, "INAT19": 1010}
_DATASETS = {"IMNET": "imagenet", "CIFAR10": "cifar10", "CIFAR100": "cifar100"}


def nb_classes(args: Dict[str, Any]) -> int:
    """Classes of the run's data set (FAKE: --nb-classes; IMNET/FOLDER: class folders of train/ if readable)."""
    ds = str(args.get("data_set", "IMNET")).upper()
    if ds in ("IMNET", "FOLDER") and args.get("data_path"):
        train = os.path.join(str(args["data_path"]), "train")
        if os.path.isdir(train):
            n = sum(1 for e in os.scandir(train) if e.is_dir())
            if n:
                return n
    if ds in _NB_CLASSES:
        return _NB_CLASSES[ds]
    return int(args.get("nb_classes") or 1000)


def toe_on(args: Dict[str, Any]) -> bool:
    r1 = args.get("toe_r1")
    return r1 is not None and float(r1) < 1.0


def _micro(args: Dict[str, Any]) -> int:
    return int(args.get("batch_size") or 64) * int(args.get("grad_accum_steps") or 1)


def world_size(args: Dict[str, Any]) -> int:
    """Training processes: from the recorded global batch (main.py's args.json), else --world_size."""
    if args.get("global_batch"):
        return max(1, int(args["global_batch"]) // _micro(args))
    return int(args.get("world_size") or 1)


def global_batch(args: Dict[str, Any], world: Optional[int] = None) -> int:
    """Images per optimizer step: --batch-size x processes x --grad-accum-steps (as recorded when given)."""
    if world is None and args.get("global_batch"):
        return int(args["global_batch"])
    return _micro(args) * (world_size(args) if world is None else world)


def _curriculum(args: Dict[str, Any]) -> Optional[str]:
    value = args.get("curriculum")
    if args.get("curriculum_table"):
        return "custom"
    return None if value in (None, "", "none") else str(value)


def run_config(args: Dict[str, Any]) -> Dict[str, Any]:
    """The configuration a table row is matched on, from a run's args.

    Keys: model, dataset ('imagenet', 'cifar10', 'cifar100', else the lower-cased --data-set: 'folder',
    'fake', ...), token_label, finetune_from ('baseline' / 'toe' from the fine-tuning checkpoint's own args,
    'unknown' if unreadable, None without --finetune), seed, global_batch, curriculum (None without one),
    toe, and with ToE on: r1, r0_ratio (r0 / r1), ng, k, layer, distance, init, expand, merge, compat.
    """
    ds = str(args.get("data_set", "IMNET")).upper()
    cfg: Dict[str, Any] = {
        "model": args.get("model"),
        "dataset": _DATASETS.get(ds, ds.lower()),
        "token_label": bool(args.get("token_label", False)),
        "finetune_from": _finetune_from(args),
        "seed": args.get("seed"),
        "global_batch": global_batch(args),
        "curriculum": _curriculum(args),
        "toe": toe_on(args),
    }
    if cfg["toe"]:
        r1 = float(args["toe_r1"])
        r0 = float(args["toe_r0"]) if args.get("toe_r0") is not None else r1 / 2
        cfg.update({"r1": r1, "r0_ratio": r0 / r1, "ng": int(args.get("toe_ng", 3)), "k": int(args.get("toe_k", 2)),
                    "layer": int(args.get("toe_layer", 1)), "distance": args.get("toe_distance", "cosine"),
                    "init": args.get("toe_init", "spatial"), "expand": not args.get("toe_no_expand", False),
                    "merge": not args.get("toe_no_merge", False), "compat": args.get("toe_compat") or "none"})
    return cfg


def _finetune_from(args: Dict[str, Any]) -> Optional[str]:
    """'baseline' / 'toe' after the --finetune checkpoint's own args, 'unknown' if unreadable, None without."""
    ft = args.get("finetune") or ""
    if not ft:
        return None
    src = _checkpoint_args(ft) if os.path.isfile(ft) else None
    if src is None:
        src = load_args(os.path.dirname(ft)) if os.path.isdir(os.path.dirname(ft) or ".") else None
    return "unknown" if src is None else ("toe" if toe_on(src) else "baseline")


def matches(cfg: Dict[str, Any], spec: Dict[str, Any]) -> bool:
    """True when every key of ``spec`` equals the run's config (floats to 1e-3)."""
    for key, want in spec.items():
        have = cfg.get(key)
        if isinstance(want, float) and not isinstance(want, bool):
            if not isinstance(have, (int, float)) or abs(float(have) - want) > 1e-3:
                return False
        elif have != want:
            return False
    return True


# ============================================================================ the table scripts' commands
# Command-line flags that say where a run reads and writes, how it is split over processes, how fast it runs
# or what it logs, not what it trains: never compared. (--lr, --batch-size and friends are compared through
# the derived keys below.)
_NOT_RECIPE = frozenset({
    "output_dir", "data_path", "batch_size", "grad_accum_steps", "world_size", "unscale_lr", "lr",
    "model_kwargs", "patch_size", "finetune", "num_workers", "pin_mem", "prefetch_factor", "persistent_workers",
    "amp", "dist_eval", "seed", "token_label_data", "print_freq", "device", "resume", "resume_changed_ok",
    "dist_url", "local_rank", "opt_impl", "compile", "grad_checkpointing", "model_ema_force_cpu", "start_epoch",
    "eval", "throughput", "skip_bad_images", "toe_sparse_eval", "lr_scaled", "global_batch"})
# Switches that no table script gives (main.py's "off" value): a run that turned one on trained differently.
_OFF: Dict[str, Any] = {"bce_loss": False, "clip_grad": None, "opt_betas": None, "lr_noise": None,
                        "cutmix_minmax": None, "ThreeAugment": False, "src": False, "resplit": False,
                        "attn_only": False, "toe_stage_epochs": None, "curriculum_table": None,
                        "token_label_gt": False}
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
    res = subprocess.run(["bash", os.path.join(_ROOT, script)], cwd=_ROOT, env=env, text=True,
                         capture_output=True, timeout=120)
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or [f"exit code {res.returncode}"]
        raise RuntimeError(f"DRY_RUN=1 bash {script} failed: {lines[-1]}")
    return [parse_command(line) for line in res.stdout.splitlines() if line.startswith("torchrun ")]


class Reference:
    """One command of a table's script: its table, run name (``table<N>/<name>``) and comparable recipe."""

    def __init__(self, table: str, name: str, recipe: Dict[str, Any]) -> None:
        self.table, self.name, self.recipe = table, name, recipe


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
    return recipe(values, world_size(args), lr_is_trained=True, finetune_from=_finetune_from(args))


def _references_of(table: str, commands: List[Tuple[int, Dict[str, Any]]]) -> List[Reference]:
    by_dir = {values.get("output_dir"): values for _, values in commands}
    refs = []
    for world, values in commands:
        source = by_dir.get(os.path.dirname(str(values.get("finetune") or "")))
        ft = None if not values.get("finetune") else ("unknown" if source is None else
                                                       "toe" if toe_on(source) else "baseline")
        name = os.path.relpath(str(values.get("output_dir")), "/out")
        refs.append(Reference(table, name, recipe(values, world, lr_is_trained=False, finetune_from=ft)))
    return refs


_REFERENCES: Dict[str, List[Reference]] = {}


def references(table: str) -> List[Reference]:
    """Every command of ``table``'s script (with TOE_COMPAT none and official where the script reads it);
    [] when the script is missing (the table's notes say so) or fails (with a warning)."""
    if table not in _REFERENCES:
        script = paper_results.TABLES[table].get("script", "")
        commands: List[Tuple[int, Dict[str, Any]]] = []
        if script and os.path.isfile(os.path.join(_ROOT, script)):  # else: no run can fill it (its notes say)
            try:
                seen = set()
                with open(os.path.join(_ROOT, script), encoding="utf-8") as f:
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


def _same(have: Any, want: Any) -> bool:
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
        return len(have) == len(want) and all(_same(a, b) for a, b in zip(have, want))
    if isinstance(have, dict) and isinstance(want, dict):
        return have.keys() == want.keys() and all(_same(have[k], want[k]) for k in have)
    return have == want


def differences(have: Dict[str, Any], want: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, the run's value, the command's value) for every recipe key of the command, and every ``_OFF``
    switch the command leaves off, on which the run differs. A key an older args.json lacks takes its
    ``_ABSENT`` value, or is not compared."""
    out = []
    for key in list(want) + [k for k in _OFF if k not in want]:
        expected = want[key] if key in want else _OFF[key]
        value = have.get(key, _ABSENT.get(key, _MISSING))
        if value is _MISSING:
            continue
        if key == "data_set":
            value, expected = str(value).upper(), str(expected).upper()
        if not _same(value, expected):
            out.append((key, value, expected))
    return out


def _flag(key: str) -> str:
    return key if " " in key else "--" + key.replace("_", "-")


def _show(value: Any) -> str:
    """A flag value as a person would type it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return " ".join(f"{k}={_show(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ============================================================================================= metrics
_FLOPS_CACHE: Dict[str, Tuple[Optional[float], str]] = {}


def _schedule(args: Dict[str, Any]) -> Any:
    """The run's toe.Schedule, or None without ToE."""
    if not toe_on(args):
        return None
    import toe

    stages = args.get("toe_stage_epochs")
    if isinstance(stages, str):
        stages = [int(e) for e in re.split(r"[,\s]+", stages.strip()) if e]
    return toe.Schedule(r1=float(args["toe_r1"]), ng=int(args.get("toe_ng", 3)), k=int(args.get("toe_k", 2)),
                        r0=args.get("toe_r0"), epochs=int(args.get("toe_epochs") or args.get("epochs", 300)),
                        stage_epochs=tuple(stages) if stages else None)


def flops_from_toe(args: Dict[str, Any], batch: int) -> Tuple[Optional[float], str]:
    """(GFLOPs per training iteration of the run's model and ToE schedule by toe.flops, "") or (None, why it
    cannot be counted: a model this checkout does not know or build with these options, a model without
    ToE-countable blocks, an input size that a curriculum changes). Any other error is a bug and raises."""
    key = json.dumps([args.get(k) for k in ("model", "model_kwargs", "patch_size", "input_size", "data_set",
                                            "nb_classes", "toe_r1", "toe_r0", "toe_ng", "toe_k", "toe_layer",
                                            "toe_epochs", "epochs", "toe_stage_epochs", "curriculum",
                                            "curriculum_table")] + [batch], sort_keys=True, default=str)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _count_flops(args, batch)
    return _FLOPS_CACHE[key]


def _count_flops(args: Dict[str, Any], batch: int) -> Tuple[Optional[float], str]:
    if _curriculum(args):
        return None, "its input size follows a curriculum, toe.flops counts one size"
    import timm

    import models  # noqa: F401  (registers LV-ViT with timm)
    from toe import flops

    name = str(args.get("model"))
    if not timm.is_model(name):
        return None, f"{name} is not a model of this checkout"
    size = int(args.get("input_size") or 224)
    try:
        model = builders.create_model(name, nb_classes(args), size,
                                      builders.model_kwargs(args.get("model_kwargs"), args.get("patch_size")))
    except UsageError as e:  # the model does not take these options
        return None, str(e)
    try:
        res = flops.gflops_per_iteration(model, _schedule(args), layer=int(args.get("toe_layer", 1)),
                                         batch_size=batch, img_size=size)
    except ValueError as e:  # no `blocks` to reduce, or --toe-layer outside them
        return None, str(e)
    return float(res["gflops"]), ""


def summarize_run(run_dir: str, rows: List[Dict[str, Any]], args: Dict[str, Any], metric: str,
                  use_flops: bool = True) -> Dict[str, Any]:
    """Metrics of one run for a table whose top-1 is ``metric`` ('test_acc1' or 'ema_test_acc1');
    ``gflops_source`` says where its GFLOPs come from: 'toe.flops', 'log' (with ``gflops_note`` saying why
    toe.flops did not count them), or None."""
    world = world_size(args)
    batch = global_batch(args)
    used = metric
    if not any(isinstance(r.get(metric), (int, float)) for r in rows):
        used = "test_acc1"  # e.g. EMA off: fall back to the model's own accuracy
    accs = [float(r[used]) for r in rows if isinstance(r.get(used), (int, float))]
    times = [float(r["epoch_time"]) for r in rows if isinstance(r.get("epoch_time"), (int, float))]
    logged = [float(r["gflops_per_iter"]) for r in rows if isinstance(r.get("gflops_per_iter"), (int, float))]
    gflops, note = flops_from_toe(args, batch) if use_flops else (None, "--no-flops")
    source = "toe.flops" if gflops is not None else ("log" if logged else None)
    if gflops is None and logged:
        gflops = sum(logged) / len(logged)
    epochs_total = int(args.get("epochs", len(rows)))
    return {
        "run": run_dir, "epochs_done": len(rows), "epochs_total": epochs_total,
        "complete": bool(rows) and rows[-1]["epoch"] >= epochs_total - 1,
        "metric": used, "top1": max(accs) if accs else None, "final_top1": accs[-1] if accs else None,
        "curve": [(int(r["epoch"]), float(r[used])) for r in rows if isinstance(r.get(used), (int, float))],
        "gpu_hours": sum(times) * world / 3600.0 if times else None, "world_size": world,
        "global_batch": batch, "gflops": gflops, "gflops_source": source,
        "gflops_note": note if source == "log" else "",
    }


class Run:
    """One run folder: its log rows, args, matching configuration and the tables it fits."""

    def __init__(self, path: str, rows: List[Dict[str, Any]], args: Dict[str, Any]) -> None:
        self.path = path
        self.rows = rows
        self.args = args
        self.config = run_config(args)
        self.recipe = run_recipe(args)
        self.fits: Set[str] = set()
        self.closest: Optional[Reference] = None
        self.diffs: List[Tuple[str, Any, Any]] = []
        self._metrics: Dict[Tuple[str, bool], Dict[str, Any]] = {}

    def place(self, tables: Iterable[str]) -> None:
        """Find the tables whose scripts hold a command with this run's recipe; without one, keep the
        closest command (fewest differences; the first table wins a tie) and the differences."""
        best: Optional[Tuple[float, Reference, List[Tuple[str, Any, Any]]]] = None
        for table in tables:
            for ref in references(table):
                diffs = differences(self.recipe, ref.recipe)
                if not diffs:
                    self.fits.add(table)
                # fewest differences; on a tie, a command with ToE on/off as in the run
                toe_differs = (ref.recipe.get("toe_r1") is None) != (self.recipe.get("toe_r1") is None)
                score = len(diffs) + 0.5 * toe_differs
                if best is None or score < best[0]:
                    best = (score, ref, diffs)
        if not self.fits and best is not None:
            _, self.closest, self.diffs = best

    def metrics(self, metric: str, use_flops: bool) -> Dict[str, Any]:
        key = (metric, use_flops)
        if key not in self._metrics:
            m = summarize_run(self.path, self.rows, self.args, metric, use_flops)
            if use_flops and m["gflops_note"] and m["gflops_note"] not in _WARNED:
                _WARNED.add(m["gflops_note"])
                warn(f"GFLOPs of {_rel(self.path)} (and its likes) from log.txt: {m['gflops_note']}")
            self._metrics[key] = m
        return self._metrics[key]


_WARNED: Set[str] = set()
_SHOWN_FROM = [os.getcwd()]  # run folders are shown relative to this (main sets the paths' common folder)


def _rel(path: str) -> str:
    rel = os.path.relpath(path, _SHOWN_FROM[0])
    return os.path.basename(path) if rel == "." else rel


def load_runs(paths: Sequence[str]) -> List[Run]:
    """All readable runs under ``paths``, placed in the tables they fit; a run folder without epoch rows or
    args is skipped with a warning."""
    runs: List[Run] = []
    for d in find_runs(paths):
        rows = runlog.epoch_rows(os.path.join(d, "log.txt"))
        if not rows:
            warn(f"skipping {d}: log.txt has no epoch yet")
            continue
        args = load_args(d)
        if args is None:
            warn(f"skipping {d}: no args.json and no readable checkpoint.pth with saved args")
            continue
        runs.append(Run(d, rows, args))
    if not runs:
        raise InputError(f"no readable run (log.txt with epochs + args) under {', '.join(paths)}")
    for run in runs:
        run.place(paper_results.TABLES)
    return runs


def left_out_lines(runs: List[Run], limit: int = 12) -> List[str]:
    """The output's first lines: the runs that fit no table, grouped by how they differ from the closest
    command of a table script, then one line per difference; [] when every run fits."""
    out = [r for r in runs if not r.fits]
    if not out:
        return []
    groups: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    for run in out:
        if run.closest is None:
            groups.setdefault(("no table script could be read", ()), []).append(_rel(run.path))
            continue
        table = run.closest.table
        where = f"closest: Table {table}, {paper_results.TABLES[table]['script']}"
        reasons = [f"{_flag(k)} {_show(have)}, not {_show(want)}" for k, have, want in run.diffs[:limit]]
        if len(run.diffs) > limit:
            rest = ", ".join(_flag(k) for k, _, _ in run.diffs[limit:])
            reasons.append(f"and {len(run.diffs) - limit} more: {rest}")
        groups.setdefault((where, tuple(reasons)), []).append(_rel(run.path))
    lines = [f"{len(out)} run(s) fit no paper table (they are in \"{YOURS}\" below); how they differ from the "
             "table scripts' commands:"]
    for (where, reasons), paths in groups.items():
        lines.append(f"  {_names(paths)} ({where}):")
        lines += [f"    {reason}" for reason in reasons]
    return lines


def _names(paths: List[str], limit: int = 6) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


# ============================================================================================== tables
def _agg(ms: List[Dict[str, Any]], key: str) -> Tuple[Optional[float], Optional[float]]:
    vals = [m[key] for m in ms if m.get(key) is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, std


class Cell:
    """The runs of one table cell, aggregated (mean over matching runs; std of top-1 when several)."""

    def __init__(self, runs: List[Run], metric: str, use_flops: bool) -> None:
        self.runs = runs
        ms = [r.metrics(metric, use_flops) for r in runs]
        self.n = len(ms)
        self.top1, self.top1_std = _agg(ms, "top1")
        self.final_top1, _ = _agg(ms, "final_top1")
        self.gflops, _ = _agg(ms, "gflops")
        sources = {m["gflops_source"] for m in ms if m["gflops_source"]}
        self.gflops_source = None if not sources else sources.pop() if len(sources) == 1 else "mixed"
        self.gpu_hours, _ = _agg(ms, "gpu_hours")
        self.complete = all(m["complete"] for m in ms)
        self.epochs = [(m["epochs_done"], m["epochs_total"]) for m in ms]
        self.metric = {m["metric"] for m in ms}
        self.measured = ms

    @property
    def empty(self) -> bool:
        return self.n == 0


def _cell(runs: List[Run], spec: Dict[str, Any], metric: str, use_flops: bool) -> Cell:
    return Cell([r for r in runs if matches(r.config, spec)], metric, use_flops)


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _sci(v: Optional[float], paper: bool = False) -> str:
    """3.3e3-style, as the paper prints GFLOPs (paper values without trailing zeros)."""
    if v is None:
        return "–"
    mant, exp = f"{v:.2e}".split("e")
    if paper:
        mant = mant.rstrip("0")
        mant = mant + "0" if mant.endswith(".") else mant
    return f"{mant}e{int(exp)}"


def _gflops(cell: Cell) -> str:
    """Measured GFLOPs/iter; ``[log]`` when (some of) it is the logged value rather than toe.flops's count."""
    return _sci(cell.gflops) + (" [log]" if cell.gflops_source in ("log", "mixed") else "")


def _hours(v: Optional[float]) -> str:
    """GPU hours: 44.2 for real runs; short smoke runs keep 3 significant digits instead of 0.0."""
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 0.1 else f"{v:.2e}"


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}x" if num and den else "–"


def _top1(cell: Cell, base: Optional[Cell] = None, delta: bool = True, want_ema: bool = False,
          value: str = "top1") -> str:
    """Measured top-1 cell text: mean [± std] [(delta to the baseline)] [n=runs] [* unfinished]; ``value``
    'final_top1' for the last epoch's."""
    v = getattr(cell, value)
    if cell.empty or v is None:
        return "–"
    s = f"{v:.2f}"
    if value == "top1" and cell.top1_std is not None:
        s += f" ± {cell.top1_std:.2f}"
    b = None if base is None or base.empty or base is cell else getattr(base, value)
    if delta and b is not None:
        s += f" ({v - b:+.2f})"
    if cell.n > 1:
        s += f" [n={cell.n}]"
    if not cell.complete:
        s += " *"
    if want_ema and "ema_test_acc1" not in cell.metric:
        s += " (no EMA)"  # the run logged no EMA accuracy: its own top-1 is shown
    return s


def _paper_top1(value: Optional[float], base: Optional[float] = None, std: Optional[float] = None,
                decimals: int = 1) -> str:
    """The paper's printed top-1 (with its std and its difference to the baseline where it prints them)."""
    if value is None:
        return "–"
    s = f"{value:.{decimals}f}"
    if std is not None:
        s += f" ± {std:g}"
    if base is not None:
        s += f" ({value - base:+.{decimals}f})"
    return s


_EXACT, _OFFICIAL = " [exact]", " [official code]"


def _variants(tid: str, specs: List[Dict[str, Any]], runs: List[Run]) -> List[Tuple[str, Optional[str], bool]]:
    """How a row of ToE ``specs`` is printed: (label suffix, --toe-compat its runs must have (None: any),
    whether the paper's numbers stand next to it). Table 9 always has an exact and an official-code row;
    elsewhere a row splits when runs of both variants fill it (the paper's numbers go with the official
    code, with which the authors trained)."""
    if not any(spec.get("toe") for spec in specs):
        return [("", None, True)]
    if tid == "9":
        return [(_EXACT, "none", False), (_OFFICIAL, "official", True)]
    found = {r.config.get("compat") for r in runs if any(matches(r.config, spec) for spec in specs)}
    if found == {"none", "official"}:
        return [("", "none", False), (_OFFICIAL, "official", True)]
    if found == {"official"}:
        return [(_OFFICIAL, "official", True)]
    return [("", None, True)]


def _with(spec: Dict[str, Any], compat: Optional[str]) -> Dict[str, Any]:
    return spec if compat is None else {**spec, "compat": compat}


def _main_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Tables 2, 3 (and 4): a baseline and ToE rows per model, with GFLOPs, GPU hours and speed-ups."""
    metric = spec["metric"]
    header = ["Model", "Method", "Top-1 (%)", "paper", "GFLOPs/iter", "paper", "GPU hours", "paper",
              "Accel. (practical)", "paper", "runs"]
    out, cells, bases = [], {}, {}
    for row in spec["rows"]:
        base_p = next(r["paper"]["top1"] for r in spec["rows"] if r["group"] == row["group"])
        for suffix, compat, show in _variants(tid, [row["match"]], runs):
            cell = _cell(runs, _with(row["match"], compat), metric, use_flops)
            base = bases.setdefault(row["group"], cell)  # the group's first row is its baseline
            p = row["paper"] if show else {}
            gf = _gflops(cell)
            if cell.gflops and base.gflops and cell is not base:
                gf += f" ({base.gflops / cell.gflops:.2f}x)"
            pgf = _sci(p.get("gflops"), paper=True) + (f" ({p['gflops_speedup']:.2f}x)" if p.get("gflops_speedup") else "")
            out.append([row["group"], row["label"] + suffix, _top1(cell, base, want_ema=metric == "ema_test_acc1"),
                        _paper_top1(p.get("top1"), None if cell is base else base_p), gf, pgf,
                        _hours(cell.gpu_hours), _f(p.get("gpu_hours"), "{:.1f}h"),
                        _ratio(base.gpu_hours, cell.gpu_hours) if cell is not base else "–",
                        _f(p.get("acceleration"), "{:.2f}x"), _runs(cell)])
            cells[f"{row['group']} {row['label']}{suffix}"] = _cell_json(cell)
    return header, out, cells


def _cifar_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Table 5: CIFAR-10 and CIFAR-100 top-1 per (pre-training, fine-tuning) pair, fine-tuning hours."""
    metric = spec["metric"]
    header = ["Model", "Pre-training", "Fine-tuning", "CIFAR-10 top-1", "paper", "CIFAR-100 top-1", "paper",
              "FT GPU hours (C10+C100)", "FT accel. (practical)", "paper", "runs"]
    out, cells = [], {}
    bases: Dict[Tuple[str, str], Cell] = {}
    ft_base_hours: Dict[Tuple[str, str], Optional[float]] = {}
    for row in spec["rows"]:
        line = [row["group"], row["label"].split(" / ")[0][4:], row["label"].split(" / ")[1][3:]]
        hours: List[float] = []
        all_cells = []
        for ds in ("cifar10", "cifar100"):
            col = row["columns"][ds]
            cell = _cell(runs, col["match"], metric, use_flops)
            base = bases.setdefault((row["group"], ds), cell)
            base_p = spec["rows"][[r["group"] for r in spec["rows"]].index(row["group"])]["columns"][ds]["top1"]
            line += [_top1(cell, base), _paper_top1(col["top1"], None if cell is base else base_p, decimals=2)]
            if cell.gpu_hours is not None:
                hours.append(cell.gpu_hours)
            all_cells.append(cell)
            cells[f"{row['group']} {row['label']} {ds}"] = _cell_json(cell)
        total = sum(hours) if len(hours) == 2 else None
        key = (row["group"], row["pretrain"])
        if row["finetune"] == "baseline":
            ft_base_hours[key] = total
        line += [_hours(total), _ratio(ft_base_hours.get(key), total),
                 f"{row['paper']['finetune_acceleration']:.1f}x", "+".join(_runs(c) for c in all_cells)]
        out.append(line)
    return header, out, cells


def _list_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Tables 6 and 8: one setting per row, with GFLOPs and GPU hours."""
    header = ["Setting", "Top-1 (%)", "paper", "GFLOPs/iter", "paper", "GPU hours", "paper", "runs"]
    out, cells = [], {}
    for row in spec["rows"]:
        for suffix, compat, show in _variants(tid, [row["match"]], runs):
            cell = _cell(runs, _with(row["match"], compat), spec["metric"], use_flops)
            p = row["paper"] if show else {}
            out.append([row["label"] + suffix, _top1(cell, delta=False), _paper_top1(p.get("top1")),
                        _gflops(cell), _sci(p.get("gflops"), paper=True), _hours(cell.gpu_hours),
                        _f(p.get("gpu_hours"), "{:.1f}h"), _runs(cell)])
            cells[row["label"] + suffix] = _cell_json(cell)
    return header, out, cells


def _column_rows(tid: str, spec: Dict[str, Any], runs: List[Run], use_flops: bool) -> Tuple[List[str], list, dict]:
    """Tables 7 and 9: one setting per row, top-1 of DeiT-tiny and DeiT-small side by side."""
    cols = list(spec["rows"][0]["columns"])
    header = ["Setting"] + [h for c in cols for h in (f"{c} top-1", "paper")] + ["runs"]
    out, cells = [], {}
    for row in spec["rows"]:
        specs = [row["columns"][c]["match"] for c in cols]
        for suffix, compat, show in _variants(tid, specs, runs):
            line, counts = [row["label"] + suffix], []
            for c in cols:
                col = row["columns"][c]
                cell = _cell(runs, _with(col["match"], compat), spec["metric"], use_flops)
                line += [_top1(cell, delta=False),
                         _paper_top1(col["top1"], std=col.get("std")) if show else "–"]
                counts.append(_runs(cell))
                cells[f"{row['label']}{suffix} {c}"] = _cell_json(cell)
            out.append(line + ["+".join(counts)])
    return header, out, cells


_LAYOUTS = {"main": _main_rows, "cifar": _cifar_rows, "list": _list_rows, "columns": _column_rows}


def build_table(tid: str, runs: List[Run], use_flops: bool) -> Dict[str, Any]:
    """One paper table filled with the runs that fit it: {'table', 'title', 'header', 'rows' (lists of str),
    'notes', 'cells' (label -> measured dicts, for --json)}."""
    spec = paper_results.TABLES[tid]
    fitting = [r for r in runs if tid in r.fits]
    header, out_rows, cells = _LAYOUTS[spec["layout"]](tid, spec, fitting, use_flops)
    notes: List[str] = []
    if not references(tid):
        notes.append(f"no run can fill this table: its script {spec.get('script') or '(none)'} is missing or fails")
    if any("*" in c for r in out_rows for c in r[1:-1]):
        notes.append("* run not finished: fewer epochs logged than --epochs")
    if any("[log]" in c for r in out_rows for c in r):
        notes.append("[log]: GFLOPs logged by main.py (toe.flops could not count the run, or --no-flops)")
    if any(_OFFICIAL in r[0] or _OFFICIAL in r[1] for r in out_rows):
        notes.append(f"{_OFFICIAL.strip()}: --toe-compat official runs, which behave as the code the paper's numbers "
                     f"come from (so the paper's numbers stand next to them); {_EXACT.strip()} and unmarked ToE "
                     "rows: --toe-compat none, the paper's equations")
    if spec.get("note"):
        notes.append(f"paper: {spec['note']}")
    notes.append("top-1: best over the logged epochs" + (" of the EMA model" if spec["metric"] == "ema_test_acc1"
                                                         else "")
                 + "; GPU hours: sum of epoch training time x processes; paper timings on RTX A6000")
    return {"table": tid, "title": spec["title"], "header": header, "rows": out_rows, "notes": notes,
            "cells": cells}


def _runs(cell: Cell) -> str:
    return str(cell.n) if cell.n else "0"


def _cell_json(cell: Cell) -> Dict[str, Any]:
    return {"runs": [r.path for r in cell.runs], "top1": cell.top1, "top1_std": cell.top1_std,
            "final_top1": cell.final_top1, "gflops": cell.gflops, "gflops_source": cell.gflops_source,
            "gpu_hours": cell.gpu_hours, "complete": cell.complete if cell.n else None}


# =========================================================================================== your runs
# Arguments that differ between otherwise equal runs without changing what they train: where they write,
# how a resume found them, and what the launcher filled in for each process.
_PAIR_IGNORED = frozenset({"output_dir", "resume", "resume_changed_ok", "start_epoch", "rank", "gpu",
                           "local_rank", "distributed", "dist_backend", "dist_url"})


def pair_key(args: Dict[str, Any]) -> str:
    """A run's arguments apart from the --toe-* flags and ``_PAIR_IGNORED``: a ToE run and its baseline share
    it."""
    kept = {k: v for k, v in args.items() if not k.startswith("toe_") and k not in _PAIR_IGNORED}
    return json.dumps(kept, sort_keys=True, default=str)


def _setup(args: Dict[str, Any]) -> str:
    """Model, data set, input size, epochs (and model kwargs) in a few words."""
    kw = builders.model_kwargs(args.get("model_kwargs"), args.get("patch_size"))
    extra = f" {_show(kw)}" if kw else ""
    return (f"{args.get('model')}{extra}, {args.get('data_set')} {args.get('input_size')}px, "
            f"{args.get('epochs')} ep, batch {global_batch(args)}")


def _method(cfg: Dict[str, Any]) -> str:
    if not cfg["toe"]:
        return "baseline"
    s = (f"ToE r1={cfg['r1']:g} r0={cfg['r1'] * cfg['r0_ratio']:g} ng={cfg['ng']} k={cfg['k']} "
         f"layer={cfg['layer']}")
    for key, default in (("distance", "cosine"), ("init", "spatial"), ("compat", "none")):
        if cfg[key] != default:
            s += f" {key}={cfg[key]}"
    s += "" if cfg["expand"] else " no-expand"
    return s + ("" if cfg["merge"] else " no-merge")


def your_groups(runs: List[Run]) -> List[Tuple[List[Run], List[Run]]]:
    """The runs that fit no paper table, as (baselines, ToE runs) sharing a :func:`pair_key`, in path order."""
    groups: Dict[str, Tuple[List[Run], List[Run]]] = {}
    for run in sorted((r for r in runs if not r.fits), key=lambda r: r.path):
        base, toes = groups.setdefault(pair_key(run.args), ([], []))
        (toes if run.config["toe"] else base).append(run)
    return [(b, sorted(t, key=lambda r: (r.config["r1"], r.path))) for b, t in groups.values()]


def build_yours(runs: List[Run], use_flops: bool) -> Optional[Dict[str, Any]]:
    """The "Your runs" table (None when every run fits a paper table): each ToE run after the baseline runs
    whose arguments equal its own apart from --toe-* and the output folder; best and final top-1 with their
    difference to the baseline, GFLOPs/iter and the theoretical speed-up, GPU hours and the practical one."""
    groups = your_groups(runs)
    if not groups:
        return None
    header = ["Run", "Setup", "Method", "Top-1 best", "Top-1 final", "GFLOPs/iter", "Speed-up (GFLOPs)",
              "GPU hours", "Speed-up (hours)"]
    out, cells = [], {}
    unpaired = 0
    for bases, toes in groups:
        base = Cell(bases, "test_acc1", use_flops)
        for run in bases + toes:
            cell = Cell([run], "test_acc1", use_flops)
            ref = base if run in toes and not base.empty else None
            unpaired += run in toes and ref is None
            out.append([_rel(run.path), _setup(run.args), _method(run.config),
                        _top1(cell, ref), _top1(cell, ref, value="final_top1"), _gflops(cell),
                        _ratio(ref.gflops, cell.gflops) if ref else "–", _hours(cell.gpu_hours),
                        _ratio(ref.gpu_hours, cell.gpu_hours) if ref else "–"])
            cells[_rel(run.path)] = {**_cell_json(cell), "baseline": [r.path for r in bases] if ref else []}
    notes = ["each ToE run follows the baseline run(s) with the same arguments apart from --toe-* and the output "
             "folder; (+x.xx): difference to the baseline (mean of several); speed-ups = baseline / run",
             "top-1: the model's own (not EMA), best over the logged epochs and at the last one; GPU hours: sum of "
             "epoch training time x processes"]
    if unpaired:
        notes.append(f"{unpaired} ToE run(s) without a baseline of the same arguments: nothing to compare with")
    if any("[log]" in c for r in out for c in r):
        notes.append("[log]: GFLOPs logged by main.py (toe.flops could not count the run, or --no-flops)")
    if any("*" in r[3] for r in out):
        notes.append("* run not finished: fewer epochs logged than --epochs")
    return {"table": "yours", "title": f"{YOURS} (they fit no paper table)", "header": header, "rows": out,
            "notes": notes, "cells": cells}


# ============================================================================================ rendering
def render_text(table: Dict[str, Any]) -> str:
    """Aligned plain-text rendering."""
    rows = [table["header"]] + table["rows"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table["header"]))]
    lines = [table["title"], ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [""] + [f"  {n}" for n in table["notes"]]
    return "\n".join(lines)


def render_markdown(table: Dict[str, Any]) -> str:
    """GitHub markdown rendering."""
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = [f"### {table['title']}", "", "| " + " | ".join(map(esc, table["header"])) + " |",
             "|" + "|".join("---" for _ in table["header"]) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in table["rows"]]
    lines += [""] + [f"- {n}" for n in table["notes"]]
    return "\n".join(lines) + "\n"


# =============================================================================================== plots
_MODEL_NAMES = {**{v: f"DeiT-{k}" for k, v in paper_results.DEIT.items()},
                **{v: f"LV-ViT-{k}" for k, v in paper_results.LVVIT.items()}}


def _default_toe(cfg: Dict[str, Any]) -> bool:
    return cfg["toe"] and matches(cfg, paper_results.TOE_DEFAULTS)


def plot_groups(runs: List[Run]) -> Dict[Tuple[str, bool], Dict[str, List[Run]]]:
    """(model, token_label) -> {'baseline': [...], 'toe': [...]} for the runs that fit a paper table, on
    ImageNet from scratch, with the paper's default ToE settings (any r1)."""
    groups: Dict[Tuple[str, bool], Dict[str, List[Run]]] = {}
    for r in runs:
        c = r.config
        if not r.fits or c["dataset"] != "imagenet" or c["finetune_from"] is not None:
            continue
        if not c["toe"] or _default_toe(c):
            g = groups.setdefault((c["model"], c["token_label"]), {"baseline": [], "toe": []})
            g["toe" if c["toe"] else "baseline"].append(r)
    return {k: v for k, v in groups.items() if v["baseline"] and v["toe"]}


def _finish_plot(plt: Any, fig: Any, ax: Any, title: str, path: str) -> str:
    """Title, grid and legend, then write ``path`` (PNG) and close the figure; returns ``path``."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_curves(plt: Any, series: List[Tuple[str, Run]], metric: str, use_flops: bool, ylabel: str,
                 title: str, path: str) -> str:
    """Fig. 3: validation top-1 per epoch of each (label, run); the baseline solid, ToE dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in series:
        curve = run.metrics(metric, use_flops)["curve"]
        ax.plot([e + 1 for e, _ in curve], [a for _, a in curve], label=label,
                linestyle="-" if label == "Baseline" else "--",
                marker="o" if len(curve) <= 30 else None)  # short runs: points stay visible
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    return _finish_plot(plt, fig, ax, title, path)


def _plot_speedup(plt: Any, base: Cell, points: List[Tuple[str, Cell]], title: str, path: str) -> str:
    """Fig. 4: top-1 against the practical (GPU hours) and theoretical (GFLOPs) acceleration of each
    (label, cell) over the baseline (1.0x)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for idx, (attr, lab, marker) in enumerate((("gpu_hours", "practical (GPU hours)", "o"),
                                               ("gflops", "theoretical (GFLOPs)", "s"))):
        pts = [(getattr(base, attr) / getattr(c, attr), c.top1, label) for label, c in points
               if getattr(base, attr) and getattr(c, attr) and c.top1 is not None]
        if base.top1 is None or not pts:
            continue
        xy = sorted([(1.0, base.top1)] + [(x, y) for x, y, _ in pts])
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=marker, label=lab)
        if idx == 0:
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.axhline(base.top1 if base.top1 is not None else 0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("acceleration over the baseline (x)")
    ax.set_ylabel("top-1 (%)")
    return _finish_plot(plt, fig, ax, title, path)


def _r1_points(toes: List[Run], metric: str, use_flops: bool) -> List[Tuple[str, Cell]]:
    by_r1: Dict[float, List[Run]] = {}
    for r in toes:
        by_r1.setdefault(round(r.config["r1"], 4), []).append(r)
    return [(f"r1={r1:g}", Cell(rs, metric, use_flops)) for r1, rs in sorted(by_r1.items())]


def draw_plots(runs: List[Run], out_dir: str, use_flops: bool) -> List[str]:
    """Fig. 3 and Fig. 4 PNGs into ``out_dir`` for the paper's models and for each group of "Your runs" with
    a baseline and a ToE run; [] with a one-line message when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib is not installed, so no plots were drawn (pip install matplotlib)",
              file=sys.stderr)
        return []
    jobs = []  # (file stem, title name, metric, baselines, ToE runs)
    for (model, token_label), g in sorted(plot_groups(runs).items()):
        slug = model + ("_token_label" if token_label else "")
        jobs.append((slug, _MODEL_NAMES.get(model, model), "ema_test_acc1" if token_label else "test_acc1",
                     g["baseline"], g["toe"]))
    for i, (bases, toes) in enumerate(g for g in your_groups(runs) if g[0] and g[1]):
        model = str(bases[0].config["model"])
        jobs.append((f"yours{i + 1}_{model}", f"{YOURS} #{i + 1} ({model})", "test_acc1", bases, toes))
    if not jobs:
        print(f"{PROG}: no plots: no model has both a baseline and a ToE run", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    for stem, name, metric, bases, toes in jobs:
        series = [("Baseline", r) for r in bases] + [(f"ToE r1={r.config['r1']:g}", r) for r in toes]
        ylabel = "validation top-1 (%)" + (" (EMA)" if metric == "ema_test_acc1" else "")
        written.append(_plot_curves(plt, series, metric, use_flops, ylabel,
                                    f"{name}: validation top-1 during training (Fig. 3)",
                                    os.path.join(out_dir, f"fig3_{stem}.png")))
        written.append(_plot_speedup(plt, Cell(bases, metric, use_flops), _r1_points(toes, metric, use_flops),
                                     f"{name}: acceleration vs top-1 over r1 (Fig. 4)",
                                     os.path.join(out_dir, f"fig4_{stem}.png")))
    return written


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


def _run_json(run: Run, use_flops: bool) -> Dict[str, Any]:
    metrics = {k: v for k, v in run.metrics("test_acc1", use_flops).items() if k != "curve"}
    left_out = [{"flag": _flag(k), "run": _show(have), "script": _show(want)} for k, have, want in run.diffs]
    return {"run": run.path, "config": run.config, "fits": sorted(run.fits),
            "closest": f"table{run.closest.table}: {run.closest.name}" if run.closest else None,
            "differences": left_out, **metrics}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry; returns the exit code."""
    try:
        args = parse_args(argv)
        tables = [t.strip() for t in args.tables.split(",") if t.strip()]
        unknown = [t for t in tables if t not in paper_results.TABLES]
        if unknown:
            raise InputError(f"--tables: unknown table {', '.join(unknown)} (known: {', '.join(paper_results.TABLES)})")
        runs = load_runs(args.paths)
    except InputError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE

    use_flops = not args.no_flops
    _SHOWN_FROM[0] = os.path.commonpath([os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")
                                         for p in args.paths])
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
              + ", ".join(_rel(p) for p in other))
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
