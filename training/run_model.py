"""The run's model as training uses it: the plain module on the device, its EMA copy, the compiled and/or DDP
wrapper the steps call, and the facts the log rows need (patches, patch size, prefix tokens, parameters)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from training import builders


class RunModel:
    """``model`` (built on CPU by builders.build_model, ToE applied) moved to ``device`` and wrapped as
    ``model_cfg`` (--model-ema, --model-ema-force-cpu, --compile) and the process placement (DDP) say."""

    def __init__(self, model: torch.nn.Module, model_cfg: Any, distributed: bool, device: torch.device) -> None:
        self.name = model_cfg.name
        self.num_patches = builders.num_patches(model)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", 16)
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.plain = model.to(device)
        self.ema = builders.build_ema(model, model_cfg)
        self.ema_device = torch.device("cpu") if model_cfg.ema_on_cpu else device
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.model = torch.compile(model, backend=model_cfg.compile_backend) if model_cfg.compile else model
        if distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def set_toe_epoch(self, epoch: int, toe_on: bool) -> None:
        """ToE's stage of ``epoch`` on the model and its EMA (every rank derives it from the epoch: they agree)."""
        if not toe_on:
            return
        import toe

        toe.set_epoch(self.model, epoch)
        if self.ema is not None:
            toe.set_epoch(self.ema.module, epoch)

    def measured_tokens(self, size: int, input_size: int, toe_on: bool) -> int:
        """Patch tokens after ToE in the last training forward at input ``size`` (measured, not predicted)."""
        patches = self.num_patches if size == input_size else (size // self.patch_size) ** 2
        if not toe_on:
            return patches
        import toe

        index: Optional[torch.Tensor] = toe.last_index(self.model)
        return int(index.shape[1]) - self.num_prefix if index is not None else patches
