"""Every model class registered in timm is either refused by ``toe.apply`` (ValueError naming the class) or
patched exactly: a tiny model of the class trains one stage-1 step on the scheduled token count and, at the
last stage, gives the unpatched model's output. A class that ToE accepts without a tiny configuration here
fails the test, so a new timm class is looked at before it is claimed.

Classes are found without building every model: each registered entry point is called with timm's
``build_model_with_cfg`` replaced by a stub that reports the class it was asked to build (entry points that
do not go through it are built on the meta device). One model per class is then built on the meta device,
which costs no memory and no initialisation, to ask ``toe.apply`` about it.
"""
import contextlib
import copy
import math
import sys
from collections import defaultdict

import pytest
import timm
import torch
from timm.models import _registry

import models  # noqa: F401  (this repository's LV-ViT joins timm's registry: walked like timm's own)
import toe
from toe import Schedule

SCHEDULE = Schedule(r1=0.5, ng=2, k=2, epochs=4)
TINY = dict(img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2, num_classes=10)  # 64 patches
# accepted class -> a tiny configuration of one of its registered models
TINY_CONFIGS = {
    "VisionTransformer": ("vit_tiny_patch16_224", TINY),
    "VisionTransformerDistilled": ("deit_tiny_distilled_patch16_224", TINY),
    "Eva": ("eva02_tiny_patch14_224", TINY),
    "Beit": ("beit_base_patch16_224", TINY),
    "LVViT": ("lvvit_s", TINY),
}


class _Found(Exception):
    def __init__(self, cls):
        super().__init__(cls.__name__)
        self.cls = cls


def _report_class(model_cls, *args, **kwargs):
    raise _Found(model_cls)


@contextlib.contextmanager
def _stubbed_builders(modules):
    saved = {m: m.build_model_with_cfg for m in modules if hasattr(m, "build_model_with_cfg")}
    for module in saved:
        module.build_model_with_cfg = _report_class
    try:
        yield
    finally:
        for module, builder in saved.items():
            module.build_model_with_cfg = builder


def classes_of_registered_models():
    """{model class: [registered names]} over timm.list_models()."""
    names = timm.list_models()
    entries = {name: _registry.model_entrypoint(name) for name in names}
    modules = {sys.modules[fn.__module__] for fn in entries.values()}
    found = defaultdict(list)
    with _stubbed_builders(modules):
        for name, entry in entries.items():
            try:
                with torch.device("meta"):
                    model = entry(pretrained=False)
            except _Found as hit:
                found[hit.cls].append(name)
            else:
                found[type(model)].append(name)
    return found


def representative(names):
    """The registered name of a class most likely to be small (cheap to build even on the meta device)."""
    def rank(name):
        hints = ("test_", "tiny", "nano", "small")
        return next((i for i, hint in enumerate(hints) if hint in name), len(hints)), len(name)
    return min(names, key=rank)


@pytest.fixture(scope="module")
def verdicts():
    """{class name: (representative name, ValueError message or None when accepted)}."""
    out = {}
    for cls, names in classes_of_registered_models().items():
        name = representative(names)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        try:
            toe.apply(model, SCHEDULE)
        except ValueError as err:
            out[cls.__name__] = (name, str(err))
        else:
            out[cls.__name__] = (name, None)
    return out


def test_every_class_is_refused_by_name_or_has_a_tiny_configuration(verdicts):
    assert len(verdicts) > 50  # the walk really covered timm's registry
    for cls_name, (name, message) in verdicts.items():
        if message is None:
            assert cls_name in TINY_CONFIGS, f"{cls_name} ({name}) is accepted but not checked: add a tiny config"
        else:
            assert message.startswith(f"ToE cannot patch {cls_name}: "), message
    accepted = sorted(c for c, (_, message) in verdicts.items() if message is None)
    assert accepted == sorted(TINY_CONFIGS)
    for refused in ("VisionTransformerRelPos", "VisionTransformerSAM", "SwinTransformer", "Cait", "ConVit",
                    "Xcit", "TNT", "NaFlexVit", "Hiera", "MultiScaleVit", "PoolingVisionTransformer"):
        assert verdicts[refused][1] is not None, refused


@pytest.mark.parametrize("cls_name", sorted(TINY_CONFIGS))
def test_accepted_classes_train_at_stage1_and_are_exact_at_the_last_stage(cls_name):
    name, kwargs = TINY_CONFIGS[cls_name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    assert type(model).__name__ == cls_name
    plain = copy.deepcopy(model).train()
    toe.apply(model, SCHEDULE)
    model.train()
    entering = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: entering.append(a[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    loss = sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    assert entering == [model.num_prefix_tokens + math.floor(0.5 * 64)]
    assert all(torch.isfinite(p.grad).all() for p in model.blocks[1].parameters() if p.grad is not None)
    toe.set_epoch(model, SCHEDULE.epochs - 1)
    with torch.no_grad():
        got, expected = model(x), plain(x)
    for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(a, b)
