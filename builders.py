"""Build the pieces of a run from plain values: the model (and ToE on it), EMA, optimizer, scheduler,
criterion and teacher. Nothing here reads argparse."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from errors import UsageError


def model_kwargs(extra: Optional[Mapping[str, Any]], patch_size: Optional[int] = None) -> Dict[str, Any]:
    """timm.create_model keyword arguments from --model-kwargs and the --patch-size shorthand."""
    kwargs = dict(extra or {})
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    return kwargs


def _default_input_size(name: str) -> Optional[int]:
    import timm

    try:
        size = timm.models.get_pretrained_cfg_value(name, "input_size")
    except Exception:  # a model registered without a pretrained cfg
        return None
    return None if size is None else int(tuple(size)[-1])


def create_model(name: str, num_classes: int, input_size: int, extra: Mapping[str, Any], **kwargs: Any):
    """timm.create_model(name) without weights. ``img_size`` is passed only when ``input_size`` differs from
    the model's own resolution, and dropped for models that take any resolution (no such argument)."""
    import timm

    import models  # noqa: F401  (registers this repository's models with timm)

    options = {**dict(extra), **kwargs}
    size_given = "img_size" in options
    if not size_given and _default_input_size(name) != input_size:
        options["img_size"] = input_size
    try:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
        except TypeError as e:
            if size_given or "img_size" not in options or "img_size" not in str(e):
                raise
            options.pop("img_size")
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
    except TypeError as e:
        raise UsageError(f"model {name} does not accept these options ({', '.join(sorted(options))}): {e}") from None
