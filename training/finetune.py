"""Start a run from another run's weights (--finetune): new classifier heads, resampled position grid."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from runtime.errors import CheckpointError


def classifier_prefixes(model: torch.nn.Module) -> List[str]:
    """State-dict prefixes of the layers sized to the number of classes, as the model declares them
    (timm's pretrained_cfg['classifier'], which may list several, e.g. LV-ViT's head and aux_head)."""
    declared = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = declared.get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    if getattr(model, "head_dist", None) is not None and "head_dist" not in names:
        names.append("head_dist")
    return [name + "." for name in names]


def _resample_pos_embed(old: torch.Tensor, model: torch.nn.Module, new_shape: Sequence[int]) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    if old.dim() != 3 or old.shape[-1] != new_shape[-1]:
        raise CheckpointError(f"incompatible --finetune checkpoint: pos_embed {tuple(old.shape)} "
                              f"vs model {tuple(new_shape)}")
    # timm stores the prefix tokens' embeddings in pos_embed unless no_embed_class is set
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise CheckpointError("incompatible --finetune checkpoint: model has no patch grid for pos_embed")
    old_patches = old.shape[1] - prefix
    side = int(round(old_patches ** 0.5))
    if old_patches <= 0 or side * side != old_patches:
        raise CheckpointError(f"incompatible --finetune checkpoint: pos_embed of {old.shape[1]} tokens "
                              f"is not {prefix} prefix + a square grid")
    # DeiT fine-tunes with plain bicubic; timm's default would also antialias
    return resample_abs_pos_embed(old, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix,
                                  interpolation="bicubic", antialias=False)


def _mismatch_report(state: Dict[str, Any], target: Dict[str, Any], dropped: List[str]) -> List[str]:
    problems = []
    missing = [k for k in target if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"shape mismatch for {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
                        f"{tuple(target[wrong[0]].shape)}")
    return problems


def adapt_state_dict(state: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, Any]:
    """Fit a checkpoint's weights to ``model`` (unwrapped): classifier layers whose shape differs are
    dropped (they keep their fresh initialisation) and ``pos_embed`` [1, P + H0*W0, C] is resampled to the
    model's grid [1, P + H*W, C].

    Returns {'state', 'dropped': [keys], 'resampled': bool}; CheckpointError when the checkpoint belongs to
    another architecture.
    """
    state = dict(state)
    target = model.state_dict()
    heads = tuple(classifier_prefixes(model))
    dropped = [k for k in state if k in target and k.startswith(heads) and state[k].shape != target[k].shape]
    for key in dropped:
        del state[key]
    resampled = "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape
    if resampled:
        state["pos_embed"] = _resample_pos_embed(state["pos_embed"], model, target["pos_embed"].shape)
    problems = _mismatch_report(state, target, dropped)
    if problems:
        raise CheckpointError("incompatible --finetune checkpoint for this model: " + "; ".join(problems))
    return {"state": state, "dropped": dropped, "resampled": resampled}
