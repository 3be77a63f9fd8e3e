"""Hugging Face ``Trainer`` integration: a callback that moves ToE to the stage of every epoch.

    import toe
    from toe.integrations.hf import ToECallback
    toe.apply(model, toe.Schedule(r1=0.5, ng=3, epochs=num_train_epochs))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[ToECallback()]).train()

Importing this module imports transformers (``pip install .[hf]``); ``import toe`` never does.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as error:  # the message names the fix; the original error stays chained
    raise ImportError("toe.integrations.hf needs Hugging Face transformers: pip install .[hf] "
                      "(or pip install -r requirements-hf.txt)") from error

from ..patch import set_epoch


class ToECallback(TrainerCallback):
    """Calls :func:`toe.set_epoch` with the 0-based epoch at the beginning of every training epoch.

    Args:
        model: the ToE-patched model (or a module containing it); default: the model the Trainer passes to
            its callbacks.
    """

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        self.model = model
        #: the epochs passed to toe.set_epoch, in order (for logs and checks)
        self.epochs: list = []

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = self.model if self.model is not None else kwargs.get("model")
        if model is None:
            raise RuntimeError("ToECallback: the Trainer passed no model; give it one: ToECallback(model)")
        # state.epoch is a float; at an epoch start it is whole, up to rounding (or past it when resuming mid-epoch)
        epoch = 0 if state.epoch is None else math.floor(state.epoch + 1e-6)
        set_epoch(model, epoch)
        self.epochs.append(epoch)
