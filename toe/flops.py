"""FLOPs per training iteration, counted the way the ToE paper counts them (Sec. 4.1, Tables 2, 3, 4, 6, 8).

The paper measures the forward pass of one image with ``thop`` and reports

    GFLOPs per training iteration = thop forward count x 3 (backward = 2 x forward) x batch size (1024),

averaged over the epochs of the stage schedule. thop's count is in multiply-accumulates (MACs); the paper
calls that number "FLOPs", and so does this module. Only what thop has a rule for is counted: ``nn.Linear``,
convolutions and normalisation layers; the attention products (``F.scaled_dot_product_attention`` or
``q @ k``), GELU and the ToE selection op itself are functional and count zero, exactly as in the paper. For the same
reason the position terms of the EVA / ViT-RoPE and BEiT families (``toe.families``) count zero: rotating q
and k by the rotary table, adding a relative-position bias, building those tables, and gathering them for the
kept tokens. Which blocks and how many prefix tokens a model has is its family's answer.

Table 4 trains with EfficientTrain's curriculum (``toe.curriculum``): the input size changes by phase, and
phases interleave with ToE's stages. Each epoch then costs the count of its (input size, stage) pair, and
the column is the mean over the epochs at batch 4096.

Two details make the count reproduce the paper to three digits:

* thop calls ``model.eval()`` before counting, and ToE only runs in training. The model is profiled inside
  a wrapper that keeps the inner model's own train/eval mode, so the ToE forward that really runs in
  training is what gets counted (the token count seen by block ``layer`` is checked against the schedule).
* thop looks rules up by *exact* module type. Recent timm wraps ``nn.LayerNorm`` in a subclass
  (``timm.layers.LayerNorm``) that thop would silently count as zero; the timm of the paper's time used
  plain ``nn.LayerNorm``. Leaf modules whose class derives from a thop-registered class get that class's
  own thop rule, which gives Table 8's 2.51/2.58/2.65/2.71e3 exactly (0.4% low otherwise). torchvision's
  ``nn.MultiheadAttention`` calls its projections functionally; a rule counts them, so a torchvision ViT
  counts as the timm ViT of the same size. Both details live in :mod:`toe.thop_count`.

Everything is counted on a deep copy (or on the fresh model a factory returns), so the caller's model never
carries thop buffers or hooks, and thop's console output is suppressed. The paper's printed values come from
``toe.paper``.

The command line (``python -m toe.flops``, installed as ``toe-flops``) and the comparison with the paper's
GFLOPs columns live in ``toe.flops_cli``. This module imports no model package: a model that timm does not know
(this repository's LV-ViT) is registered by importing its module first, e.g. ``import_model_modules(["models"])``
or ``--model-module models`` on the command line.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import thop_count
from .curriculum import Curriculum
from .families import resolve
from .patch import unwrap_model

__all__ = ["forward_macs", "gflops_per_iteration", "macs_to_gflops", "create_model", "import_model_modules",
           "input_shape", "patch_size_of", "one_thread"]

# A model, a timm model name, or a factory: a callable with no arguments returning a fresh model.
ModelLike = Union[str, nn.Module, Callable[[], nn.Module]]

# Forward + backward: the paper follows Hobbhahn & Sevilla [43], backward = 2 x forward.
PASSES_PER_ITERATION = 3


def macs_to_gflops(macs: float, batch_size: int = 1024) -> float:
    """thop forward MACs of one image -> the paper's GFLOPs per training iteration of ``batch_size`` images."""
    return macs * PASSES_PER_ITERATION * batch_size / 1e9


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[-2], size[-1])


def input_shape(model: nn.Module, img_size: Optional[Union[int, Sequence[int]]]) -> Tuple[int, int, int]:
    """(C, H, W) of one input image: ``img_size`` if given, else the model's patch embedding / config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cfg_size = cfg.get("input_size")
    patch_embed = getattr(model, "patch_embed", None)
    # The first convolution sees the image (timm's patch projection, LV-ViT's conv stem); the config's
    # input_size would miss a model created with another in_chans.
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    in_chans = getattr(first_conv, "in_channels", None) or (cfg_size[0] if cfg_size else 3)
    if img_size is None:
        img_size = getattr(patch_embed, "img_size", None) or (cfg_size[1:] if cfg_size else 224)
    h, w = _pair(img_size)
    return int(in_chans), h, w


def _probe_input(model: nn.Module, shape: Tuple[int, int, int]) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn((1,) + tuple(shape), device=device, dtype=dtype)


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread, restoring the caller's setting. Counting pushes one image through the
    model: threads buy nothing there, and on a busy machine OpenMP threads that wait for each other make model
    creation, copies and the forward 3-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def forward_macs(model: nn.Module, *, img_size: Optional[Union[int, Sequence[int]]] = None,
                 train: bool = True) -> float:
    """thop MACs of one forward pass of one image [1, C, H, W] through a deep copy of ``model``.

    The copy is put in train (default) or eval mode; if ToE is applied to ``model``, it runs (in train mode)
    at the epoch last given to ``toe.set_epoch``. ``img_size`` defaults to the model's own input size.
    """
    with one_thread():
        work = copy.deepcopy(unwrap_model(model))
        work.train(train)
        macs, _, _ = thop_count.profile(work, _probe_input(work, input_shape(work, img_size)))
    return macs


def create_model(name: str, img_size: Optional[Union[int, Sequence[int]]] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` for a name in timm's registry (models of other
    packages are there once their module is imported, see :func:`import_model_modules`). Raises ValueError
    for an unknown name."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (not registered with timm: import the module that "
                         f"registers it first, e.g. --model-module models for this repository's LV-ViT)")
    if img_size is not None:
        kwargs["img_size"] = img_size
    with one_thread():  # weight init is many small ops: threads only contend on a busy machine
        return timm.create_model(name, pretrained=False, **kwargs)


def import_model_modules(modules: Optional[Sequence[str]] = None) -> List[str]:
    """Import the modules that register extra models with timm (e.g. ``["models"]``, this repository's LV-ViT);
    returns the names imported. None or [] imports nothing: which package holds a project's models is the
    caller's to say, never guessed. ValueError when a named module does not import."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--model-module {module}: cannot import it ({err})") from None
    return list(modules or ())


def gflops_per_iteration(model: ModelLike, schedule: Any = None, *, layer: int = 1, batch_size: int = 1024,
                         img_size: Optional[Union[int, Sequence[int]]] = None,
                         curriculum: Optional[Curriculum] = None, epochs: Optional[int] = None
                         ) -> Dict[str, Any]:
    """The paper's GFLOPs per training iteration, per ToE stage and averaged over the training epochs.

    Each stage is counted by really running it: a deep copy of the model (or the model created from the
    name, or returned by the factory) gets ``toe.apply(copy, schedule, layer=layer)``, ``train()``,
    ``toe.set_epoch`` to the stage's first epoch, and one image [1, C, H, W] through thop. The caller's
    model is never modified.

    With a ``curriculum`` (Table 4), epoch e trains at ``curriculum.input_size(e)`` in ToE stage
    ``schedule.stage(e)``: each distinct (size, stage) pair is profiled once and the average is over the
    ``epochs`` training epochs. The model must accept every size (timm ViTs: created with
    ``dynamic_img_size=True``, which a model name gets automatically here).

    Args:
        model: a model of a ToE family (``toe.families``: timm ViT, EVA / ViT-RoPE, BEiT, LV-ViT, ...), a
            timm model name for :func:`create_model`, or a callable with no arguments returning a fresh model.
            Without a schedule, any model with ``blocks`` can be counted.
        schedule: a ``toe.Schedule`` (r0, r1, ng, k); None counts the full-token model only.
        layer: index of the block whose input ToE reduces (1 = the paper's default).
        batch_size: images per iteration (the paper's 1024; 4096 in Table 4).
        img_size: input resolution of the baseline (the final / evaluation size); default the model's own.
        curriculum: a ``toe.curriculum.Curriculum`` of training input sizes; None trains at ``img_size``.
        epochs: training epochs the curriculum average runs over (default ``schedule.epochs``); only with
            a curriculum (without one, the schedule's stage lengths weight the stages).

    Returns:
        dict with ``model``, ``img_size`` [H, W], ``batch_size``, ``layer``, ``num_prefix_tokens``,
        ``num_patches`` (M at ``img_size``), ``baseline`` {tokens, macs, gflops} (full tokens at
        ``img_size``), ``stages`` (without a curriculum: list of {stage, start_epoch, epochs, keep_rate,
        tokens (prefix included, as processed by block ``layer``), macs, gflops}), ``segments`` (with a
        curriculum: list of {start_epoch, epochs, phase, input_size, magnitude, stage (None without a
        schedule), keep_rate, num_patches, tokens, macs, gflops} per run of epochs in one phase and stage),
        ``gflops`` (the average over the epochs; the baseline's without schedule and curriculum),
        ``speedup`` (baseline / average, the theoretical acceleration), ``schedule`` (its fields or None) and
        ``curriculum`` ({table, epochs} or None).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    if curriculum is not None and not isinstance(curriculum, Curriculum):
        raise ValueError(f"curriculum must be a toe.curriculum.Curriculum, got {type(curriculum).__name__}")
    if curriculum is None and epochs is not None:
        raise ValueError("epochs is only used with a curriculum (the schedule's own epochs weight its stages)")
    if curriculum is not None:
        if epochs is None:
            if schedule is None:
                raise ValueError("epochs is required with a curriculum and no schedule")
            epochs = schedule.epochs
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs}")
        late = [s for s in curriculum.phase_starts() if s >= epochs]
        if late:
            raise ValueError(f"curriculum has phases starting at epochs {late}, never reached in epochs={epochs}")
    with one_thread():
        work, name = _private_model(model, img_size, dynamic=curriculum is not None)
        return _gflops_per_iteration(work, name, schedule, layer, batch_size, img_size, curriculum, epochs)


def _private_model(model: ModelLike, img_size: Optional[Union[int, Sequence[int]]], dynamic: bool
                   ) -> Tuple[nn.Module, str]:
    """A model this module may modify (thop buffers, ToE hook) and its name."""
    if isinstance(model, str):
        kwargs = {"dynamic_img_size": True} if dynamic else {}
        try:
            return create_model(model, img_size=img_size, **kwargs), model
        except TypeError as err:  # e.g. a model class without dynamic_img_size
            raise ValueError(f"cannot create {model} with {kwargs or 'default arguments'} ({err})") from None
    if isinstance(model, nn.Module):
        work = copy.deepcopy(unwrap_model(model))  # thop and ToE never touch the caller's model
    elif callable(model):
        work = model()
        if not isinstance(work, nn.Module):
            raise ValueError(f"the model factory must return an nn.Module, got {type(work).__name__}")
        work = unwrap_model(work)
    else:
        raise ValueError(f"model must be a model name, an nn.Module or a factory returning one, "
                         f"got {type(model).__name__}")
    cfg = getattr(work, "pretrained_cfg", None) or {}
    return work, cfg.get("architecture", type(work).__name__)


def _blocks_and_prefix(work: nn.Module, name: str, needs_toe: bool) -> Tuple[Sequence[nn.Module], int]:
    """The blocks and prefix-token count of ``work``, as its ToE family (``toe.families``) sees them. A model
    of no family can still have its full-token count taken (``needs_toe`` False) when it has ``blocks``."""
    try:
        family = resolve(work)
    except ValueError as err:
        if needs_toe or getattr(work, "blocks", None) is None:
            raise ValueError(f"{name}: cannot count ToE stages ({err})") from None
        return work.blocks, int(getattr(work, "num_prefix_tokens", 0))
    return family.blocks(work), family.num_prefix_tokens(work)


def _count(work: nn.Module, name: str, x: torch.Tensor, layer: int, schedule: Any, epoch: Optional[int],
           resized: bool = False) -> Dict[str, Any]:
    """Profile ``work`` on ``x`` at ``epoch`` (ToE at that epoch's stage; None: full tokens) and check the
    tokens block ``layer`` processed against the schedule. ``resized``: ``x`` has a curriculum's size, so a
    failure is reported as a model that cannot change its input size."""
    import toe

    blocks, prefix = _blocks_and_prefix(work, name, needs_toe=False)
    if epoch is not None:
        toe.set_epoch(work, epoch)
    try:
        macs, entering, tokens = thop_count.profile(work, x, blocks[layer])
    except (RuntimeError, AssertionError) as err:
        if not resized:
            raise
        raise ValueError(f"{name} cannot run at input size {tuple(x.shape[-2:])} ({err}); a curriculum needs "
                         f"a model that accepts every size (timm ViTs: dynamic_img_size=True)") from None
    if entering is None or tokens is None:
        raise RuntimeError(f"could not read the token count of {name}.blocks[{layer}]")
    num_patches = entering - prefix
    expected = entering if epoch is None else prefix + schedule.num_tokens(epoch, num_patches)
    if tokens != expected:
        # The count must be of what runs in training; a silent mismatch would misreport the paper's column.
        raise RuntimeError(f"{name} at epoch {epoch}: block {layer} ran on {tokens} tokens, the schedule "
                           f"keeps {expected}")
    return {"macs": macs, "num_patches": num_patches, "tokens": tokens}


def _gflops_per_iteration(work: nn.Module, name: str, schedule: Any, layer: int, batch_size: int,
                          img_size: Optional[Union[int, Sequence[int]]], curriculum: Optional[Curriculum],
                          epochs: Optional[int]) -> Dict[str, Any]:
    import toe

    if toe.is_applied(work):
        toe.remove(work)
    blocks, prefix = _blocks_and_prefix(work, name, needs_toe=schedule is not None)
    if int(layer) != layer or not (0 <= layer < len(blocks)):
        raise ValueError(f"layer must be in [0, {len(blocks) - 1}] for {name}, got {layer}")
    shape = input_shape(work, img_size)
    x = _probe_input(work, shape)

    work.train()
    base = _count(work, name, x, layer, None, None)
    result: Dict[str, Any] = {
        "model": name, "img_size": [shape[1], shape[2]], "batch_size": int(batch_size), "layer": int(layer),
        "num_prefix_tokens": prefix, "num_patches": base["num_patches"],
        "baseline": {"tokens": base["tokens"], "macs": base["macs"],
                     "gflops": macs_to_gflops(base["macs"], batch_size)},
        "stages": [], "segments": [], "schedule": None, "curriculum": None,
    }
    if schedule is not None:
        result["schedule"] = {"r0": schedule.r0, "r1": schedule.r1, "ng": schedule.ng, "k": schedule.k,
                              "epochs": schedule.epochs,
                              "stage_epochs": list(schedule.stage_epochs) if schedule.stage_epochs else None}
        toe.apply(work, schedule, layer=layer)
    if curriculum is not None:
        result["curriculum"] = {"table": curriculum.to_table(), "epochs": int(epochs)}
        result["segments"] = _curriculum_segments(work, name, shape[0], layer, schedule, curriculum, epochs,
                                                  batch_size)
        weighted = sum(seg["gflops"] * seg["epochs"] for seg in result["segments"])
        result["gflops"] = weighted / epochs
    elif schedule is not None:
        weighted = 0.0
        for start, length in zip(schedule.stage_starts(), schedule.stage_lengths()):
            if length <= 0:
                continue
            counted = _count(work, name, x, layer, schedule, start)
            gflops = macs_to_gflops(counted["macs"], batch_size)
            weighted += gflops * length
            result["stages"].append({"stage": schedule.stage(start), "start_epoch": start, "epochs": int(length),
                                     "keep_rate": schedule.keep_rate(start), "tokens": counted["tokens"],
                                     "macs": counted["macs"], "gflops": gflops})
        result["gflops"] = weighted / schedule.epochs
    else:
        result["gflops"] = result["baseline"]["gflops"]
    result["speedup"] = result["baseline"]["gflops"] / result["gflops"]
    return result


def _curriculum_segments(work: nn.Module, name: str, in_chans: int, layer: int, schedule: Any,
                         curriculum: Curriculum, epochs: int, batch_size: int) -> List[Dict[str, Any]]:
    """One entry per run of epochs in one curriculum phase and one ToE stage; each distinct (input size,
    stage) pair is profiled once."""
    runs: List[List[Any]] = []  # [start, length, size, stage]
    for epoch in range(epochs):
        key = [curriculum.input_size(epoch), schedule.stage(epoch) if schedule is not None else None]
        if runs and runs[-1][2:] == key and curriculum.phase(epoch) == curriculum.phase(runs[-1][0]):
            runs[-1][1] += 1
        else:
            runs.append([epoch, 1] + key)
    counted: Dict[Tuple[int, Optional[int]], Dict[str, Any]] = {}
    segments = []
    for start, length, size, stage in runs:
        if (size, stage) not in counted:
            x = _probe_input(work, (in_chans, size, size))
            counted[(size, stage)] = _count(work, name, x, layer, schedule, start if stage is not None else None,
                                            resized=True)
        c = counted[(size, stage)]
        segments.append({"start_epoch": start, "epochs": length, "phase": curriculum.phase(start),
                         "input_size": size, "magnitude": curriculum.magnitude(start), "stage": stage,
                         "keep_rate": schedule.keep_rate(start) if stage is not None else 1.0,
                         "num_patches": c["num_patches"], "tokens": c["tokens"], "macs": c["macs"],
                         "gflops": macs_to_gflops(c["macs"], batch_size)})
    return segments



def patch_size_of(model: nn.Module) -> int:
    """The side of a (square) patch of ``model``'s patch embedding; ValueError when it has none."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"the curriculum needs square patches, the model has {tuple(size)}")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ValueError("cannot read the model's patch size (patch_embed.patch_size): give --curriculum-table")
    return size


if __name__ == "__main__":
    # `python -m toe.flops` runs the command line, which lives in toe.flops_cli (and imports this module)
    import runpy

    runpy.run_module("toe.flops_cli", run_name="__main__", alter_sys=True)
