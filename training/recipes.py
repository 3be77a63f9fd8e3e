"""What a training recipe decides: the training set, the model's extra outputs, and the loss.

Plain classification (DeiT, with optional distillation) and LV-ViT token labeling differ only here, so
the trainer asks its recipe instead of branching on flags.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import datasets
import losses
from runtime.errors import UsageError


class ClassificationRecipe:
    """Images with class labels; cross-entropy (soft targets under mixup, or BCE), plus distillation."""

    uses_mixup = True

    def __init__(self, data_cfg: Any, distill_cfg: Any) -> None:
        self.data_cfg = data_cfg
        self.distill_cfg = distill_cfg

    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def train_dataset(self, aug: Any, num_classes: int, seed: int):
        # --data-backend dali augments the files itself (dali_loader): the data set only lists them
        transform = None if self.data_cfg.backend == "dali" else datasets.build_transform(True, aug)
        dataset, _ = datasets.build_dataset(True, self.data_cfg.spec, transform)
        return dataset

    def criterion(self, teacher: Optional[Any], mixup_active: bool):
        base = losses.build_base_criterion(mixup_active=mixup_active, smoothing=self.data_cfg.smoothing,
                                           bce_loss=self.data_cfg.bce_loss)
        return losses.DistillationLoss(base, teacher, self.distill_cfg.kind, self.distill_cfg.alpha,
                                       self.distill_cfg.tau)


class TokenLabelRecipe:
    """LV-ViT token labeling: each image comes with its teacher's dense label map; the loss supervises the
    class token and every patch token; MixToken replaces mixup/cutmix."""

    uses_mixup = False

    def __init__(self, data_cfg: Any, label_cfg: Any) -> None:
        self.data_cfg = data_cfg
        self.label_cfg = label_cfg

    def model_kwargs(self) -> Dict[str, Any]:
        # LV-ViT's dense training output: (class logits, aux logits, MixToken box, kept-position mask)
        return {"return_dense": True, "mix_token": self.label_cfg.mix_token,
                "toe_dense_loss": self.label_cfg.dense_loss}

    def train_dataset(self, aug: Any, num_classes: int, seed: int):
        import token_label

        spec = self.data_cfg.spec
        if not self.label_cfg.label_root:  # FAKE without maps: deterministic synthetic maps
            images, _ = datasets.build_dataset(True, spec, datasets.build_transform(True, aug))
            return token_label.SyntheticTokenLabels(images, num_classes, self.label_cfg.label_size, seed=seed)
        try:
            return token_label.build_token_label_dataset(
                os.path.join(spec.path, "train"), self.label_cfg.label_root, aug.input_size,
                self.label_cfg.label_size, **token_label_augment_kwargs(aug), target=self.label_cfg.target,
                skip_bad_images=spec.skip_bad_images)
        except ValueError as e:  # a bad --aa policy string
            raise UsageError(f"--{e}") from None

    def criterion(self, teacher: Optional[Any], mixup_active: bool):
        import token_label

        # the dataset and the loss must agree on the target kind: both read label_cfg.target
        return token_label.TokenLabelCriterion(self.label_cfg.cls_weight, self.label_cfg.dense_weight,
                                               self.data_cfg.smoothing, target=self.label_cfg.target,
                                               ground_truth=self.label_cfg.ground_truth)


def token_label_augment_kwargs(aug: Any) -> Dict[str, Any]:
    """The augmentation keyword arguments of token_label.build_token_label_dataset from an AugmentConfig."""
    return {"aa": datasets.auto_augment_policy(aug.aa), "color_jitter": aug.color_jitter,
            "interpolation": aug.train_interpolation,
            "re_prob": aug.reprob, "re_mode": aug.remode, "re_count": aug.recount}


def recipe_for(cfg: Any):
    if cfg.token_label is not None:
        return TokenLabelRecipe(cfg.data, cfg.token_label)
    return ClassificationRecipe(cfg.data, cfg.distill)
