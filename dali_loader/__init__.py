"""``--data-backend dali``: the DeiT training and evaluation input pipelines on NVIDIA DALI.

- ``require_dali()``: import check; without the package, DataError naming what to install.
- ``DaliTrainLoader`` / ``DaliEvalLoader`` (loader.py): iterables of (images [B, 3, S, S], labels [B]) fed by
  the repository's samplers, drop-in for the trainer's DataLoaders.
- pipeline.py: the DALI graphs; randaugment.py: timm's RandAugment with DALI's ``@augmentation`` API.

The submodules import DALI, so import them only after ``require_dali()``.
"""
from __future__ import annotations

from runtime.errors import DataError

INSTALL_HINT = "pip install -r requirements-dali.txt (package nvidia-dali-cuda120)"


def require_dali() -> None:
    """Raise DataError (one line, exit 2) when NVIDIA DALI cannot be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise DataError(f"--data-backend dali needs NVIDIA DALI, which cannot be imported ({e}); "
                        f"{INSTALL_HINT}") from None
