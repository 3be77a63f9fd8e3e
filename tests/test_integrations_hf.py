"""toe.integrations.hf.ToECallback under a real (tiny) Hugging Face Trainer run on fake data.

Needs transformers and accelerate (requirements-hf.txt): skipped with the reason without them, unless
TOE_REQUIRE_HF=1 (CI)."""
from __future__ import annotations

import pytest
import torch

import toe
from conftest import require_transformers

transformers = require_transformers()


class FakeImages(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def test_callback_sets_the_epoch_and_the_stage_follows(tmp_path):
    from toe.integrations.hf import ToECallback

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=4, num_labels=3)
    model = transformers.ViTForImageClassification(config)
    toe.apply(model, toe.Schedule(r1=0.5, ng=3, k=2, epochs=3))
    toe.set_epoch(model, 2)  # the callback, not this, must bring epoch 0 back to stage 1

    class Record(transformers.TrainerCallback):  # runs after ToECallback, on the same events
        def __init__(self):
            self.rates, self.tokens, self.current = [], [], None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.rates.append(toe.current_rates(kwargs["model"])[-1])
            self.current = []
            self.tokens.append(self.current)

    record = Record()
    model.vit.layers[1].register_forward_pre_hook(
        lambda module, args: record.current.append(args[0].shape[1]) if module.training else None)
    callback = ToECallback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no", use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=FakeImages(8),
                                   callbacks=[callback, record])
    before = model.classifier.weight.detach().clone()
    trainer.train()
    assert callback.epochs == [0, 1, 2]
    assert record.rates == [0.5, 0.75, 1.0]
    assert record.tokens == [[1 + 32] * 2, [1 + 48] * 2, [1 + 64] * 2]  # 8 images / batch 4 = 2 steps per epoch
    assert not torch.equal(model.classifier.weight, before)  # it trained


def test_callback_without_a_model_names_the_fix():
    from toe.integrations.hf import ToECallback

    state = transformers.TrainerState()
    with pytest.raises(RuntimeError, match="ToECallback\\(model\\)"):
        ToECallback().on_epoch_begin(None, state, transformers.TrainerControl())
