"""ToE on timm's Eva (EVA-02, ViT-RoPE axial / mixed, PE, DINOv3) and Beit (relative position bias) models:
exactness against compositions built here from the unpatched model, with the kept rotary rows and bias
entries gathered by plain indexing, one sample at a time."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import toe
from toe import Schedule

TINY = dict(img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2, num_classes=10)  # 64 patches
SCHEDULE = Schedule(r1=0.5, ng=2, k=2, epochs=4)  # stage 1: keep 32 of 64 patches; epochs 2-3: all
LAST_EPOCH = 3

EVA = {
    "eva02": ("eva02_tiny_patch14_224", {}),
    "rope-axial": ("vit_small_patch16_rope_224", {}),
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", {}),
    "pe-core": ("vit_pe_core_tiny_patch16_384", {}),  # attn_type 'rope', xy grid, attention pooling
    "dinov3": ("vit_small_patch16_dinov3", {}),  # class token + 4 registers, DINOv3 rope
    "rope-augment": ("eva02_tiny_patch14_224", dict(rope_shift_coords=1.0, rope_jitter_coords=1.5,
                                                     rope_rescale_coords=1.2)),
    "patch-drop": ("eva02_tiny_patch14_224", dict(patch_drop_rate=0.25)),
    "mixed-patch-drop": ("vit_small_patch16_rope_mixed_224", dict(patch_drop_rate=0.25)),
}
BEIT = {
    "beit": ("beit_base_patch16_224", {}),
    "beitv2": ("beitv2_base_patch16_224", {}),
    "shared-bias": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    "both-biases": ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True)),
}
ALL = {**EVA, **BEIT}


def create(name, **overrides):
    torch.manual_seed(0)
    model = timm.create_model(name, **{**TINY, **overrides})
    with torch.no_grad():  # BEiT's bias tables start at zero and EVA's head near zero: make them matter
        for pname, p in model.named_parameters():
            if "relative_position_bias_table" in pname or pname.startswith("head."):
                p.normal_(0.0, 1.0)
    return model


def patched_and_plain(key, layer=1):
    name, overrides = ALL[key]
    model = create(name, **overrides)
    plain = copy.deepcopy(model)
    toe.apply(model, SCHEDULE, layer=layer)
    return model.train(), plain.train()


def seeded(fn, *args, **kwargs):
    torch.manual_seed(123)  # patch dropout and rope augmentation draw from the global generator
    return fn(*args, **kwargs)


def image(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def kept_rows(rope, positions):
    """Rows of the kept patch positions [B, n] of a rope table [M, D], [h, M, D] or [B, h, M, D]."""
    if rope is None:
        return None
    out = []
    for b in range(positions.shape[0]):
        table = rope[b] if rope.dim() == 4 else rope
        out.append(table[..., positions[b], :])
    out = torch.stack(out)
    return out if out.dim() == 4 else out.unsqueeze(1)


def kept_pairs(bias, index):
    """Entries between the kept positions [B, n] of a bias [H, N, N] -> [B, H, n, n]."""
    return torch.stack([bias[:, index[b]][:, :, index[b]] for b in range(index.shape[0])])


def eva_ropes(plain, rope):
    depth = len(plain.blocks)
    if getattr(plain, "rope_mixed", False) and rope is not None:
        return [rope[i] for i in range(depth)]
    return [rope] * depth


def eva_by_hand(plain, x, layer, rates, k):
    """Logits of the ToE forward composed from the unpatched Eva: blocks[:layer] with the full rope, the op,
    blocks[layer:] with the kept rows; also the tokens after block ``layer`` and the kept index."""
    tokens, rope = plain._pos_embed(plain.patch_embed(x))
    tokens = plain.norm_pre(tokens)
    ropes = eva_ropes(plain, rope)
    prefix = plain.num_prefix_tokens
    for i in range(layer):
        tokens = plain.blocks[i](tokens, rope=ropes[i])
    tokens, index = toe.token_expansion(tokens, rates, k, num_prefix_tokens=prefix)
    after = None
    for i in range(layer, len(plain.blocks)):
        tokens = plain.blocks[i](tokens, rope=kept_rows(ropes[i], index[:, prefix:] - prefix))
        after = tokens if after is None else after
    return plain.forward_head(plain.norm(tokens)), after, index


def rotate(x, rope, half):
    """timm's rotary formula: x cos + rot(x) sin, rot pairing (2i, 2i+1), or the two halves with ``half``."""
    sin, cos = rope.chunk(2, dim=-1)
    if half:
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + turned * sin


def attention_by_hand(attn, x, heads_first_bias=None, rope=None, prefix=1):
    """Softmax attention of timm's EVA / BEiT attention modules written out from their weights."""
    batch, length, _ = x.shape
    bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if attn.q_bias is not None else None
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :prefix], rotate(q[:, :, prefix:], rope, half)], dim=2)
        k = torch.cat([k[:, :, :prefix], rotate(k[:, :, prefix:], rope, half)], dim=2)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if heads_first_bias is not None:
        logits = logits + heads_first_bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
    return attn.proj(getattr(attn, "norm", torch.nn.Identity())(out))


def block_by_hand(block, x, **attention):
    """Pre-norm block (EVA / BEiT): x + gamma_1 attn(norm1 x); x + gamma_2 mlp(norm2 x)."""
    y = attention_by_hand(block.attn, block.norm1(x), **attention)
    x = x + (block.gamma_1 * y if block.gamma_1 is not None else y)
    y = block.mlp(block.norm2(x))
    return x + (block.gamma_2 * y if block.gamma_2 is not None else y)


def outputs_of(blocks):
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, b in enumerate(blocks)]
    return seen, handles


@pytest.mark.parametrize("key", sorted(ALL))
def test_last_stage_equals_plain_and_stage1_keeps_the_schedule(key):
    model, plain = patched_and_plain(key)
    x = image()
    prefix = model.num_prefix_tokens
    entering = []
    handle = model.blocks[2].register_forward_pre_hook(lambda m, a: entering.append(a[0].shape[1]))
    out = seeded(model, x)
    patches = 64 - (16 if "drop" in key else 0)  # patch dropout keeps 48 of 64 before ToE sees them
    assert entering == [prefix + math.floor(0.5 * patches)]
    (out * torch.linspace(-1, 2, 10)).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("blocks.1.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    handle.remove()
    toe.set_epoch(model, LAST_EPOCH)
    assert torch.equal(seeded(model, x), seeded(plain, x))


@pytest.mark.parametrize("key", sorted(EVA))
def test_eva_stage1_is_the_composition_with_kept_rope_rows(key):
    model, plain = patched_and_plain(key)
    x = image()
    expected, after, index = seeded(eva_by_hand, plain, x, 1, SCHEDULE.rates(1), SCHEDULE.k)
    seen, handles = outputs_of(model.blocks)
    got = seeded(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[1], after, rtol=1e-5, atol=1e-5)
    assert torch.equal(toe.last_index(model), index)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("key", ["eva02", "rope-mixed"])
def test_eva_other_layers(key, layer):
    model, plain = patched_and_plain(key, layer=layer)
    x = image()
    expected, _, _ = eva_by_hand(plain, x, layer, SCHEDULE.rates(1), SCHEDULE.k)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_eva02_kept_features_equal_hand_built_blocks(fused):
    """EVA-02: the kept tokens after the patched block and after the last block equal blocks written out
    from their weights, with the kept tokens' rope rows gathered here."""
    model, plain = patched_and_plain("eva02")
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = image()
    seen, handles = outputs_of(model.blocks)
    model(x)
    tokens, rope = plain._pos_embed(plain.patch_embed(x))
    tokens = plain.blocks[0](plain.norm_pre(tokens), rope=rope)
    tokens, index = toe.token_expansion(tokens, SCHEDULE.rates(1), SCHEDULE.k, num_prefix_tokens=1)
    rows = kept_rows(rope, index[:, 1:] - 1)
    for i in (1, 2):
        tokens = block_by_hand(plain.blocks[i], tokens, rope=rows)
        torch.testing.assert_close(seen[i], tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("key", sorted(BEIT))
def test_beit_kept_features_equal_hand_built_blocks(key, fused):
    """BEiT: the relative position bias (per attention and / or shared) is gathered at the kept tokens'
    positions, class token included, whether the attention is fused or not."""
    model, plain = patched_and_plain(key)
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = image()
    seen, handles = outputs_of(model.blocks)
    out = model(x)
    tokens = torch.cat([plain.cls_token.expand(2, -1, -1), plain.patch_embed(x)], dim=1)
    if plain.pos_embed is not None:
        tokens = tokens + plain.pos_embed
    shared = plain.rel_pos_bias() if plain.rel_pos_bias is not None else None
    tokens = plain.blocks[0](tokens, shared_rel_pos_bias=shared)
    tokens, index = toe.token_expansion(tokens, SCHEDULE.rates(1), SCHEDULE.k, num_prefix_tokens=1)
    for i in (1, 2):
        attn = plain.blocks[i].attn
        bias = torch.zeros(())
        if attn.relative_position_bias_table is not None:
            full = attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)
            bias = bias + kept_pairs(full, index)
        if shared is not None:
            bias = bias + kept_pairs(shared, index)
        tokens = block_by_hand(plain.blocks[i], tokens, heads_first_bias=bias)
        torch.testing.assert_close(seen[i], tokens, rtol=1e-5, atol=1e-5)
    expected = plain.forward_head(plain.norm(tokens))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["eva02", "rope-mixed", "beit", "both-biases"])
def test_state_dict_remove_deepcopy_set_epoch(key):
    model, plain = patched_and_plain(key)
    plain_state = plain.state_dict()
    state = model.state_dict()
    assert list(state) == list(plain_state) and all(torch.equal(state[k], plain_state[k]) for k in state)
    x = image()
    reduced = model(x)
    twin = copy.deepcopy(model)  # an EMA copy: own hook, own overrides, bound to the copy's modules
    torch.testing.assert_close(twin(x), reduced, rtol=0, atol=0)
    toe.set_epoch(twin, LAST_EPOCH)
    assert toe.current_rates(model) == SCHEDULE.rates(1) and toe.current_rates(twin) == SCHEDULE.rates(2)
    assert torch.equal(twin(x), plain(x))
    assert torch.equal(model(x), reduced)  # the original still reduces
    toe.remove(model)
    assert not toe.is_applied(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all("_get_rel_pos_bias" not in vars(m) for m in model.modules())
    assert torch.equal(model(x), plain(x))
    toe.apply(model, SCHEDULE)  # applies again after removal
    assert torch.equal(model(x), reduced)


def test_eva_rope_positional_and_checkpointed_blocks():
    """Blocks that receive rope positionally, or through timm's gradient checkpointing, get the kept rows."""
    model, _ = patched_and_plain("rope-mixed")
    x = image()
    expected = model.forward_features(x)
    tokens, rope = model._pos_embed(model.patch_embed(x))
    tokens = model.norm_pre(tokens)
    for i, block in enumerate(model.blocks):
        tokens = block(tokens, rope[i])
    torch.testing.assert_close(model.norm(tokens), expected, rtol=1e-6, atol=1e-6)
    model.set_grad_checkpointing(True)
    out = model.forward_features(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert model.blocks[2].attn.proj.weight.grad is not None


def test_attention_mask_is_gathered_and_is_causal_refused():
    model, plain = patched_and_plain("eva02")
    x = image()
    mask = torch.rand(2, 1, 65, 65, generator=torch.Generator().manual_seed(3)) > 0.3
    mask |= torch.eye(65, dtype=torch.bool)
    seen, handles = outputs_of(model.blocks)
    out = model.forward_features(x, attn_mask=mask)
    tokens, rope = plain._pos_embed(plain.patch_embed(x))
    tokens = plain.blocks[0](plain.norm_pre(tokens), rope=rope, attn_mask=mask)
    tokens, index = toe.token_expansion(tokens, SCHEDULE.rates(1), SCHEDULE.k, num_prefix_tokens=1)
    kept_mask = torch.stack([mask[b][:, index[b]][:, :, index[b]] for b in range(2)])
    for block in plain.blocks[1:]:
        tokens = block(tokens, rope=kept_rows(rope, index[:, 1:] - 1), attn_mask=kept_mask)
    torch.testing.assert_close(out, plain.norm(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="is_causal"):
        model.forward_features(x, is_causal=True)


def test_unknown_rope_layout_is_refused():
    model = create("eva02_tiny_patch14_224")
    model.rope = torch.nn.Identity()
    with pytest.raises(ValueError, match="Eva.*rotary embedding Identity"):
        toe.apply(model, SCHEDULE)
    model = create("eva02_tiny_patch14_224")
    model.blocks[2].attn.num_prefix_tokens = 0
    with pytest.raises(ValueError, match="block 2 applies rotary embeddings after 0 prefix tokens"):
        toe.apply(model, SCHEDULE)


SMALL = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2, num_classes=10)


@pytest.mark.parametrize("name,kwargs,message", [
    ("test_vit_relpos", SMALL, "VisionTransformerRelPos: its attention uses relative position terms"),
    ("cait_xxs24_224", dict(SMALL, depth_token_only=1), "Cait: its class token joins after the blocks"),
    ("convit_tiny", dict(SMALL, local_up_to_layer=1), "ConVit: its class token joins between the blocks"),
    ("xcit_nano_12_p16_224", dict(SMALL, patch_size=16, cls_attn_layers=1),
     "Xcit: its class token joins after the blocks"),
    ("tnt_s_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, inner_dim=16, num_classes=10),
     "TNT: its blocks need more than the token sequence"),
    ("samvit_base_patch16", dict(SMALL, global_attn_indexes=(), window_size=4, use_rel_pos=False, neck_chans=16),
     "VisionTransformerSAM: it is not one of the supported families"),
])
def test_lookalikes_are_refused_with_the_reason(name, kwargs, message):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with pytest.raises(ValueError, match=message):
        toe.apply(model, SCHEDULE)
    assert not toe.is_applied(model)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["eva02", "beit"])
def test_compiled_equals_eager_one_graph_per_stage(key):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, plain = patched_and_plain(key)
    x = image()
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.blocks[2].attn.qkv.weight.grad is not None
    compiled(x)
    toe.set_epoch(model, LAST_EPOCH)
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["stats"])


@pytest.mark.parametrize("key", ["eva02", "both-biases"])
def test_ddp_wrapper_trains_like_the_patched_model(key, tmp_path):
    """DistributedDataParallel (gloo, one process): toe.apply / set_epoch through the wrapper; the training
    step's output and every gradient equal those of the same model patched without the wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, plain = patched_and_plain(key)
    x = image()
    seeded(model, x).square().sum().backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(plain.train())
        toe.apply(ddp, SCHEDULE)
        toe.set_epoch(ddp, 0)
        out = seeded(ddp, x)
        out.square().sum().backward()
        assert toe.last_index(ddp).shape[1] == plain.num_prefix_tokens + 32
        torch.testing.assert_close(out, seeded(model, x), rtol=0, atol=0)
        grads = dict(model.named_parameters())
        for name, p in plain.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)
        toe.set_epoch(ddp, LAST_EPOCH)
        assert toe.current_rates(ddp) == SCHEDULE.rates(2)
    finally:
        dist.destroy_process_group()
