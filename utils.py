"""Training utilities: distributed set-up, progress logging, crash-safe checkpoints, RNG, fine-tuning.

Nothing here reads argparse; functions take plain values so tests and other entry points can use them.
"""
from __future__ import annotations

import builtins
import datetime
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist


# --------------------------------------------------------------------------------------------- errors
class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (a user error: exit code 2)."""


# --------------------------------------------------------------------------------------------- distributed
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on non-master ranks; print(..., force=True) still prints."""
    builtin_print = builtins.print

    def print_(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def init_distributed_mode(args: Any) -> None:
    """Set args.distributed/rank/world_size/gpu/dist_backend and start the process group when launched
    by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).

    Backend: nccl when training on CUDA, gloo on CPU.
    """
    use_cuda = str(args.device).startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        ngpus = max(torch.cuda.device_count(), 1)
        args.gpu = int(os.environ.get("SLURM_LOCALID", args.rank % ngpus))
        # env:// needs a rendezvous address; SLURM gives the first node's name (run_with_submitit sets it).
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
            os.environ["MASTER_ADDR"] = _first_slurm_host(nodelist)
        os.environ["RANK"] = str(args.rank)
        os.environ["WORLD_SIZE"] = str(args.world_size)
        os.environ["LOCAL_RANK"] = str(args.gpu)
    else:
        args.distributed = False
        args.rank = 0
        args.world_size = 1
        args.gpu = 0
        args.dist_backend = "none"
        return

    args.distributed = args.world_size > 1
    if not args.distributed:
        args.dist_backend = "none"
        return
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    setup_for_distributed(args.rank == 0)
    print(f"| distributed init (rank {args.rank}/{args.world_size}, backend {args.dist_backend}, "
          f"url {args.dist_url})", force=True)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[001-004,007],cpu01' -> 'gpu001'."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("-")[0].split(",")[0].rstrip("]")
        return prefix + first
    return head


def all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    """Sum a few scalars across ranks (float64 so counts stay exact); identity when not distributed."""
    if not is_dist_avail_and_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------- progress
class SmoothedValue:
    """Tracks a series; reports the windowed median/avg and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(list(self.deque))) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(list(self.deque))) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak on GPU, the process' max RSS on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2 ** 20


class ProgressLogger:
    """Iterates a loader and prints `header [i/N] eta loss lr img/s mem` every `print_freq` iterations."""

    def __init__(self, header: str, print_freq: int, device: torch.device, delimiter: str = "  ") -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.header = header
        self.print_freq = max(int(print_freq), 1)
        self.device = device
        self.delimiter = delimiter

    def update(self, **kwargs: float) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f"{k}: {v}" for k, v in self.meters.items())

    def log_every(self, iterable: Iterable, batch_size_fn=None) -> Iterator:
        """Yield from `iterable`; `batch_size_fn(item)` gives the images per item (for img/s)."""
        total = len(iterable)  # type: ignore[arg-type]
        width = len(str(total))
        start = time.time()
        last = start
        seen = 0
        seen_since = 0
        for i, obj in enumerate(iterable):
            yield obj
            n = batch_size_fn(obj) if batch_size_fn is not None else 0
            seen += n
            seen_since += n
            if (i + 1) % self.print_freq == 0 or i == total - 1:
                now = time.time()
                elapsed = now - start
                eta = elapsed / (i + 1) * (total - i - 1)
                rate = seen_since / max(now - last, 1e-9)
                last, seen_since = now, 0
                print(self.delimiter.join([
                    f"{self.header} [{i + 1:>{width}}/{total}]",
                    f"eta: {datetime.timedelta(seconds=int(eta))}",
                    str(self),
                    f"img/s: {rate:.1f}",
                    f"mem: {memory_mb(self.device):.0f}MB",
                ]), flush=True)
        total_time = time.time() - start
        print(f"{self.header} total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total, 1):.4f} s/it)", flush=True)


# --------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices)."""
    seed = int(seed) % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(base_seed: int, rank: int, epoch: int) -> int:
    """A seed for (seed, rank, epoch), so an epoch's randomness does not depend on what ran before it:
    a resumed run draws the same augmentations, mixup and drop-path as an uninterrupted one."""
    return int(np.random.SeedSequence([int(base_seed) % 2 ** 32, int(rank), int(epoch)]).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: torch seeds python `random` and torch per worker, numpy it does not."""
    np.random.seed(torch.initial_seed() % 2 ** 32)


def get_rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain types, so they load under torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of get_rng_state."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------- files
def atomic_write_bytes_fn(path: str, write_fn) -> None:
    """Write via `write_fn(file_obj)` to a temp file in the same directory, fsync, then os.replace:
    a crash leaves either the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_on_master(obj: Any, path: str) -> None:
    """torch.save `obj` atomically, on rank 0 only."""
    if is_main_process():
        atomic_write_bytes_fn(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes_fn(path, lambda f: f.write(text.encode("utf-8")))


def plain_args(args: Any) -> Dict[str, Any]:
    """argparse.Namespace -> dict of plain python values (safe for weights_only loading)."""

    def conv(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return str(v)

    return {k: conv(v) for k, v in vars(args).items()}


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """torch.load(weights_only=True) on CPU; any failure becomes one CheckpointError line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/unsafe-global errors all mean "not a usable checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (not a torch.save file, truncated, or holding "
                              f"objects other than tensors and plain data): {first[:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def model_state_from_checkpoint(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a training checkpoint ({'model': ...}) or of a bare state_dict."""
    for key in ("model", "state_dict", "model_ema"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                    scaler: Optional[Any], model_ema: Optional[Any], epoch: int, args: Any,
                    max_accuracy: float, extra: Optional[Dict[str, Any]] = None) -> None:
    """Atomically save everything needed to continue bitwise after `epoch` (rank 0 only)."""
    state: Dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "epoch": int(epoch),
        "max_accuracy": float(max_accuracy),
        "rng": get_rng_state(),
        "args": plain_args(args),
    }
    if extra:
        state.update(extra)
    save_on_master(state, path)


# --------------------------------------------------------------------------------------------- log.txt
def read_log(path: str) -> List[Dict[str, Any]]:
    """Parse log.txt (one JSON object per line); unreadable trailing lines (torn writes) are dropped."""
    rows: List[Dict[str, Any]] = []
    if not os.path.isfile(path):
        return rows
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_log(path: str, keep_before_epoch: int) -> None:
    """Keep only the entries of epochs < keep_before_epoch, rewritten atomically, so a resumed run
    logs each epoch exactly once."""
    if not os.path.isfile(path):
        return
    rows = [r for r in read_log(path) if isinstance(r.get("epoch"), int) and r["epoch"] < keep_before_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_log(path: str, row: Dict[str, Any]) -> None:
    """Append one JSON line; written whole with one write and fsync'ed."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- fine-tuning
def adapt_state_dict_for_finetune(state: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, Any]:
    """Prepare a checkpoint's weights for `model` (a plain, unwrapped timm-style model):
    drop classifier heads whose shape differs (new number of classes) and resample `pos_embed`
    [1, P + H0*W0, C] to the model's grid [1, P + H*W, C].

    Returns {'state': new_state, 'dropped': [keys], 'resampled': bool}. Raises CheckpointError when the
    checkpoint belongs to a different architecture (other missing/unexpected keys or shapes).
    """
    from timm.layers import resample_abs_pos_embed

    state = dict(state)
    target = model.state_dict()
    head_prefixes = ("head.", "head_dist.", "fc.", "classifier.", "head.fc.")
    dropped: List[str] = []
    for key in list(state.keys()):
        if key in target and key.startswith(head_prefixes) and state[key].shape != target[key].shape:
            dropped.append(key)
            del state[key]

    resampled = False
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        old, new = state["pos_embed"], target["pos_embed"]
        if old.dim() != 3 or old.shape[-1] != new.shape[-1]:
            raise CheckpointError(f"incompatible --finetune checkpoint: pos_embed {tuple(old.shape)} "
                                  f"vs model {tuple(new.shape)}")
        # timm keeps prefix tokens inside pos_embed unless no_embed_class is set
        num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            raise CheckpointError("incompatible --finetune checkpoint: model has no patch grid for pos_embed")
        old_n = old.shape[1] - num_prefix
        side = int(round(old_n ** 0.5))
        if side * side != old_n or old_n <= 0:
            raise CheckpointError(f"incompatible --finetune checkpoint: pos_embed of {old.shape[1]} tokens "
                                  f"is not {num_prefix} prefix + a square grid")
        # bicubic without antialiasing, as DeiT fine-tunes (timm's default would antialias)
        state["pos_embed"] = resample_abs_pos_embed(old, new_size=list(grid), old_size=[side, side],
                                                    num_prefix_tokens=num_prefix, interpolation="bicubic",
                                                    antialias=False)
        resampled = True

    missing = [k for k in target if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}")
        raise CheckpointError("incompatible --finetune checkpoint for this model: " + "; ".join(parts))
    return {"state": state, "dropped": dropped, "resampled": resampled}
