"""A run's arguments and the configuration a paper-table row is matched on.

A run's arguments come from its ``args.json`` when present, else from the ``args`` entry of its
``checkpoint.pth`` (``best_checkpoint.pth``), read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from report.common import InputError

# =============================================================================================== reading
_ARGS_CACHE: Dict[str, Optional[Dict[str, Any]]] = {}


def checkpoint_args(path: str) -> Optional[Dict[str, Any]]:
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
        args = checkpoint_args(os.path.join(run_dir, name))
        if args is not None:
            return args
    return None


OLD_RUN = re.compile(r"old-\d{8}-\d{6}(-\d+)?")


def find_runs(paths: Sequence[str]) -> List[str]:
    """Every folder holding a log.txt under ``paths`` (deduplicated, sorted), leaving out the ``old-<time>/``
    folders that ``--overwrite`` moved aside inside a run (name one as a path to read it). InputError on a
    missing path or a path with no log.txt under it."""
    found: List[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f"no such file or directory: {path}")
        if os.path.isfile(path):
            if os.path.basename(path) != "log.txt":
                raise InputError(f"not a run folder or log.txt: {path}")
            here = [os.path.dirname(os.path.abspath(path))]
        else:
            here = []
            for d, subdirs, files in os.walk(path):
                if "log.txt" in files:
                    here.append(os.path.abspath(d))
                    # main.py --overwrite keeps a run's predecessors in <run>/old-<time>/: not runs of their own
                    subdirs[:] = [s for s in subdirs if not OLD_RUN.fullmatch(s)]
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


def curriculum_of(args: Dict[str, Any]) -> Optional[str]:
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
        "finetune_from": finetune_from(args),
        "seed": args.get("seed"),
        "global_batch": global_batch(args),
        "curriculum": curriculum_of(args),
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


def finetune_from(args: Dict[str, Any]) -> Optional[str]:
    """'baseline' / 'toe' after the --finetune checkpoint's own args, 'unknown' if unreadable, None without."""
    ft = args.get("finetune") or ""
    if not ft:
        return None
    src = checkpoint_args(ft) if os.path.isfile(ft) else None
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

