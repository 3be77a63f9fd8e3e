"""toe.apply on Hugging Face transformers image encoders (tiny configurations, no downloaded weights):
ViT, DeiT (2 prefix tokens), Dinov2 (with and without registers) and the CLIP / SigLIP vision towers.

Needs transformers (requirements-hf.txt): skipped with the reason without it, unless TOE_REQUIRE_HF=1 (CI)."""
from __future__ import annotations

import pytest
import torch

import toe
from conftest import require_transformers
from family_checks import (SCHEDULE, Case, check_compile_one_graph_per_stage, check_ddp, check_last_stage_equals_plain,
                           check_set_epoch_deepcopy_state_dict_remove, check_stage_one, last_layer_output)

transformers = require_transformers()

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4)
MLP = dict(intermediate_size=64)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
DUAL = dict(text_config=TEXT, vision_config={**SIZE, **MLP})  # CLIPConfig / SiglipConfig


def builder(model_class: str, config_class: str, **config):
    def build():
        torch.manual_seed(0)
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    return build


def layer_call(layer, tokens):
    return layer(tokens, None)  # as the encoders call them: (hidden_states, attention_mask)


def case(name, model_class, config_class, config, core, layers, prefix, pre=None):
    """A Case whose embeddings are ``<core>.embeddings`` (then ``<core>.<pre>``) and layers ``<core>.<layers>``."""
    def owner(model):
        return getattr(model, core) if core else model

    def embed(model, x):
        tokens = owner(model).embeddings(x)
        return getattr(owner(model), pre)(tokens) if pre else tokens

    def blocks(model):
        module = owner(model)
        for part in layers.split("."):
            module = getattr(module, part)
        return module

    return Case(name, builder(model_class, config_class, **config), embed, blocks, prefix, layer_call)


CASES = [
    case("ViTModel", "ViTModel", "ViTConfig", {**SIZE, **MLP}, "", "layers", 1),
    case("ViTForImageClassification", "ViTForImageClassification", "ViTConfig", {**SIZE, **MLP, "num_labels": 5},
         "vit", "layers", 1),
    case("DeiTModel", "DeiTModel", "DeiTConfig", {**SIZE, **MLP}, "", "layers", 2),
    case("DeiTForImageClassification", "DeiTForImageClassification", "DeiTConfig", {**SIZE, **MLP, "num_labels": 5},
         "deit", "layers", 2),
    case("DeiTForImageClassificationWithTeacher", "DeiTForImageClassificationWithTeacher", "DeiTConfig",
         {**SIZE, **MLP, "num_labels": 5}, "deit", "layers", 2),
    case("Dinov2Model", "Dinov2Model", "Dinov2Config", SIZE, "", "encoder.layer", 1),
    case("Dinov2ForImageClassification", "Dinov2ForImageClassification", "Dinov2Config", {**SIZE, "num_labels": 5},
         "dinov2", "encoder.layer", 1),
    case("Dinov2WithRegistersModel", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
         {**SIZE, "num_register_tokens": 3}, "", "encoder.layer", 4),
    case("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersForImageClassification",
         "Dinov2WithRegistersConfig", {**SIZE, "num_register_tokens": 2, "num_labels": 5}, "dinov2_with_registers",
         "encoder.layer", 3),
    case("CLIPVisionModel", "CLIPVisionModel", "CLIPVisionConfig", {**SIZE, **MLP}, "", "encoder.layers", 1,
         pre="pre_layrnorm"),
    case("CLIPVisionModelWithProjection", "CLIPVisionModelWithProjection", "CLIPVisionConfig",
         {**SIZE, **MLP, "projection_dim": 16}, "vision_model", "encoder.layers", 1, pre="pre_layrnorm"),
    case("CLIPForImageClassification", "CLIPForImageClassification", "CLIPConfig",
         {**DUAL, "num_labels": 5}, "vision_model", "encoder.layers", 1, pre="pre_layrnorm"),
    case("SiglipVisionModel", "SiglipVisionModel", "SiglipVisionConfig", {**SIZE, **MLP}, "", "encoder.layers", 0),
    case("SiglipForImageClassification", "SiglipForImageClassification", "SiglipConfig",
         {**DUAL, "num_labels": 5}, "vision_model", "encoder.layers", 0),
]
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_last_stage_equals_plain(case):
    check_last_stage_equals_plain(case)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stage_one_is_the_composition_by_hand(case, layer):
    check_stage_one(case, layer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_set_epoch_deepcopy_state_dict_and_remove(case):
    check_set_epoch_deepcopy_state_dict_remove(case)


@pytest.mark.parametrize("case", [CASES[1], CASES[-1]], ids=[IDS[1], IDS[-1]])
def test_ddp_on_one_gloo_process(case, tmp_path):
    check_ddp(case, str(tmp_path / "store"))


def test_heads_read_the_kept_prefix_tokens():
    """DeiT with teacher: the two heads are the classifiers on tokens 0 and 1 of the hand composition."""
    (deit,) = [c for c in CASES if c.name == "DeiTForImageClassificationWithTeacher"]
    model = deit.build()
    plain = deit.build()
    toe.apply(model, SCHEDULE).train()
    plain.train()
    x = torch.randn(2, 3, 32, 32)
    out, features = last_layer_output(deit, model, x)
    tokens = plain.deit.layernorm(features)
    torch.testing.assert_close(out.cls_logits, plain.cls_classifier(tokens[:, 0]))
    torch.testing.assert_close(out.distillation_logits, plain.distillation_classifier(tokens[:, 1]))
    assert features.shape[1] == 2 + 32


def test_subclass_of_a_supported_class_is_accepted():
    class MyViT(transformers.ViTForImageClassification):
        pass

    model = MyViT(transformers.ViTConfig(**SIZE, **MLP))
    toe.apply(model, SCHEDULE).train()
    model(torch.randn(1, 3, 32, 32))
    assert toe.last_index(model).shape == (1, 1 + 32)


def _clip_config(model: str):
    return getattr(transformers, f"{model}Config")(**DUAL)


@pytest.mark.parametrize("build, needle", [
    (lambda: transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**SIZE, **MLP)), "folds every patch"),
    (lambda: transformers.DeiTForMaskedImageModeling(transformers.DeiTConfig(**SIZE, **MLP)), "folds every patch"),
    (lambda: transformers.Dinov2Backbone(transformers.Dinov2Config(**SIZE, out_features=["stage2"])), "feature maps"),
    (lambda: transformers.CLIPModel(_clip_config("CLIP")), "model.vision_model"),
    (lambda: transformers.SiglipModel(_clip_config("Siglip")), "model.vision_model"),
    (lambda: transformers.ViTModel(transformers.ViTConfig(**SIZE, **MLP, attn_implementation="flex_attention")),
     "flex_attention"),
    (lambda: transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                            num_heads=[1, 1])), "not one of the supported families"),
    (lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), "not one of the supported families"),
], ids=["vit-mim", "deit-mim", "dinov2-backbone", "clip", "siglip", "flex", "swin", "clip-text"])
def test_refused_at_apply(build, needle):
    model = build()
    with pytest.raises(ValueError, match=f"ToE cannot patch {type(model).__name__}: .*{needle}"):
        toe.apply(model, SCHEDULE)
    assert not toe.is_applied(model)


def test_dual_models_take_toe_on_their_vision_tower():
    model = transformers.CLIPModel(_clip_config("CLIP"))
    toe.apply(model.vision_model, SCHEDULE)
    model.train()
    out = model(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=torch.randn(2, 3, 32, 32))
    assert out.vision_model_output.last_hidden_state.shape[1] == 1 + 32
    assert toe.last_index(model.vision_model).shape == (2, 1 + 32)


def test_attention_mask_refused_when_reducing_and_exact_when_not():
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**SIZE, **MLP))
    plain = transformers.ViTModel(transformers.ViTConfig(**SIZE, **MLP))
    plain.load_state_dict(model.state_dict())
    toe.apply(model, SCHEDULE).train()
    plain.train()
    mask = torch.ones(2, 65)
    mask[:, -5:] = 0  # a real padding mask (an all-ones mask is dropped by transformers before the layers)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="attention mask .* sized to the full sequence"):
        model(x, attention_mask=mask)
    toe.set_epoch(model, SCHEDULE.epochs - 1)
    torch.testing.assert_close(model(x, attention_mask=mask).last_hidden_state,
                               plain(x, attention_mask=mask).last_hidden_state, rtol=0, atol=0)


def test_output_hidden_states_show_the_reduction():
    model = toe.apply(CASES[0].build(), SCHEDULE, layer=1).train()
    out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 65, 33]


# ~2.5 s each: ViTForImageClassification by default, the other families with the slow tests (CI)
@pytest.mark.parametrize("case", [c if c.name == "ViTForImageClassification"
                                  else pytest.param(c, marks=pytest.mark.slow) for c in CASES], ids=IDS)
def test_compile_one_graph_per_stage(case):
    check_compile_one_graph_per_stage(case)


def test_gradient_checkpointing_keeps_toe():
    """transformers checkpoints the layer's forward, not its call: the ToE hook runs once, outside, and the
    gradients equal those of the same patched model without checkpointing."""
    (vit,) = [c for c in CASES if c.name == "ViTForImageClassification"]
    model, twin = vit.build(), vit.build()
    for m in (model, twin):
        toe.apply(m, SCHEDULE).train()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.vit.layers)
    x = torch.randn(2, 3, 32, 32)
    out, features = last_layer_output(vit, model, x)
    ref = twin(x)
    assert features.shape[1] == 1 + 32
    out.logits.sum().backward()
    ref.logits.sum().backward()
    torch.testing.assert_close(out.logits, ref.logits)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
