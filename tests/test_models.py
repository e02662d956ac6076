"""Parity of the flax.nnx LLaVA with transformers' PyTorch modules holding the same weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import hf_llava_from_model, torch_module_state
from llava_jax.convert import mapping
from llava_jax.models import abstract_model, count_params, create_model, get_preset
from llava_jax.models.projector import Projector

TOL = 1e-4


def tiny(**changes):
    return get_preset("tiny").replace(**changes)


def make_inputs(config, batch=2, text_before=3, text_after=5, seed=0):
    """input_ids with one image run per row; random pixels [b, 1, H, W, 3]."""
    rng = np.random.default_rng(seed)
    vocab = config.text.vocab_size
    rows = []
    for _ in range(batch):
        before = rng.integers(3, vocab - 2, text_before)
        after = rng.integers(3, vocab - 2, text_after)
        image = np.full(config.num_image_tokens, config.image_token_index)
        rows.append(np.concatenate([[1], before, image, after]))
    ids = np.stack(rows).astype(np.int32)
    ids[ids == config.image_token_index] = config.image_token_index  # keep
    size = config.vision.image_size
    pixels = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)
    return ids, pixels


def to_torch_pixels(pixels):
    """[b, n, H, W, 3] -> torch [b * n, 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(pixels.reshape(-1, *pixels.shape[2:]).transpose(0, 3, 1, 2)))


def test_param_counts_match_transformers():
    # Exactly transformers' LlavaForConditionalGeneration (vocab 32064, whole CLIP tower).
    assert count_params(abstract_model(get_preset("llava-v1.5-7b"))) == 7_063_427_072
    assert count_params(abstract_model(get_preset("llava-v1.5-13b"))) == 13_351_494_656


def test_param_count_matches_tiny_transformers_model():
    model = create_model(tiny())
    reference = hf_llava_from_model(model)
    torch_count = sum(p.numel() for p in reference.parameters())
    assert count_params(model) == torch_count


@pytest.mark.parametrize("changes", [
    {},  # GQA (4 heads, 2 kv heads), untied head
    {"text": {"num_kv_heads": 4}},  # plain multi-head attention
    {"text": {"tie_word_embeddings": True}, "vision_feature_select_strategy": "cls_patch"},
    {"vision_feature_layer": (-3, -1)},
], ids=["gqa", "mha", "tied_cls_patch", "multi_layer"])
def test_llava_logits_match_transformers(changes):
    config = tiny(**changes)
    model = create_model(config, seed=1)
    reference = hf_llava_from_model(model)
    ids, pixels = make_inputs(config)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(ids).long(),
                           pixel_values=to_torch_pixels(pixels)).logits.numpy()
    assert ours.dtype == np.float32 and ours.shape == (*ids.shape, config.text.vocab_size)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_text_only_and_padding_match_transformers():
    config = tiny()
    model = create_model(config, seed=2)
    reference = hf_llava_from_model(model)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 500, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding on the second row
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(ids).long(),
                           attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("layer,strategy", [(-2, "patch"), (-1, "cls_patch"), (0, "patch"),
                                            ((-2, 1), "patch")])
def test_clip_features_match_transformers(layer, strategy):
    config = tiny(vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    model = create_model(config, seed=4)
    reference = hf_llava_from_model(model)
    _, pixels = make_inputs(config, batch=3)
    ours = np.asarray(model.vision_tower(jnp.asarray(pixels[:, 0])))
    with torch.no_grad():
        states = reference.model.vision_tower(to_torch_pixels(pixels),
                                              output_hidden_states=True).hidden_states
    layers = layer if isinstance(layer, tuple) else (layer,)
    theirs = torch.cat([states[i] for i in layers], dim=-1).numpy()
    theirs = theirs if strategy == "cls_patch" else theirs[:, 1:]
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def torch_projector(projector_type, in_features, hidden, tensors):
    """The original LLaVA builder's projector (Linear / Sequential with exact GELU)."""
    depth = {"linear": 1, "mlp2x_gelu": 2, "mlp3x_gelu": 3}[projector_type]
    layers = []
    for i in range(depth):
        if i:
            layers.append(torch.nn.GELU())
        linear = torch.nn.Linear(in_features if i == 0 else hidden, hidden)
        linear.weight.data = torch.from_numpy(tensors[f"multi_modal_projector.linear_{i + 1}.weight"].copy())
        linear.bias.data = torch.from_numpy(tensors[f"multi_modal_projector.linear_{i + 1}.bias"].copy())
        layers.append(linear)
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"])
def test_projectors_match_torch(projector_type):
    changes = {"projector_type": projector_type}
    if projector_type == "identity":
        changes["vision"] = {"hidden_size": 128, "num_heads": 4}
    config = tiny(**changes)
    model = create_model(config, seed=5)
    features = np.random.default_rng(6).standard_normal((2, 7, config.projector_input_size)).astype(np.float32)
    ours = np.asarray(model.multi_modal_projector(jnp.asarray(features)))
    if projector_type == "identity":
        np.testing.assert_array_equal(ours, features)
        return
    module = torch_projector(projector_type, config.projector_input_size, config.text.hidden_size,
                             mapping.torch_tensors(model))
    with torch.no_grad():
        theirs = module(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_several_images_per_sample_and_image_mask():
    """The k-th placeholder run gets the k-th real image, whatever the slot layout."""
    config = tiny()
    model = create_model(config, seed=7)
    n = config.num_image_tokens
    rng = np.random.default_rng(8)
    pixels = rng.standard_normal((1, 3, 32, 32, 3)).astype(np.float32)
    ids = np.array([[1, 5] + [config.image_token_index] * n + [6] + [config.image_token_index] * n + [7]],
                   np.int32)
    # Slots 0 and 2 are real, slot 1 is an empty (masked) slot.
    image_mask = np.array([[True, False, True]])
    ours = model.embed(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(image_mask))
    features = model.image_features(jnp.asarray(pixels))  # [1, 3n, hidden]
    chex.assert_trees_all_close(ours[0, 2:2 + n], features[0, :n], atol=1e-6)
    chex.assert_trees_all_close(ours[0, 3 + n:3 + 2 * n], features[0, 2 * n:], atol=1e-6)
    text = model.language_model.embed(jnp.asarray(ids))
    chex.assert_trees_all_close(ours[0, :2], text[0, :2])


def test_packed_segments_equal_separate_samples():
    config = tiny()
    model = create_model(config, seed=9)
    rng = np.random.default_rng(10)
    a, b = rng.integers(3, 500, 7), rng.integers(3, 500, 5)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None].astype(np.int32))
    segments = jnp.asarray(np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32))
    positions = jnp.asarray(np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32))
    out = model(packed, segment_ids=segments, positions=positions)
    alone_a = model(jnp.asarray(a[None].astype(np.int32)))
    alone_b = model(jnp.asarray(b[None].astype(np.int32)))
    chex.assert_trees_all_close(out[0, :7], alone_a[0], atol=1e-5)
    chex.assert_trees_all_close(out[0, 7:12], alone_b[0], atol=1e-5)


def test_kv_cache_prefill_then_decode_equals_full_forward():
    config = tiny()
    model = create_model(config, seed=11)
    ids, pixels = make_inputs(config, batch=2)
    full = model(jnp.asarray(ids), jnp.asarray(pixels))
    prompt = ids.shape[1] - 3
    cache = model.init_cache(2, ids.shape[1] + 4)
    logits, cache = model(jnp.asarray(ids[:, :prompt]), jnp.asarray(pixels), cache=cache,
                          cache_index=0)
    chex.assert_trees_all_close(logits, full[:, :prompt], atol=1e-5)
    for t in range(prompt, ids.shape[1]):
        step, cache = model(jnp.asarray(ids[:, t:t + 1]), cache=cache, cache_index=t)
        chex.assert_trees_all_close(step[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("changes", [{"scan_layers": False}, {"remat_policy": "full"},
                                     {"remat_policy": "dots_with_no_batch_dims_saveable"}])
def test_scan_and_remat_switches_do_not_change_results(changes):
    base = create_model(tiny(), seed=12)
    other = create_model(tiny(**changes), seed=12)
    ids, pixels = make_inputs(base.config)

    def loss(model):
        return model(jnp.asarray(ids), jnp.asarray(pixels)).mean()

    from flax import nnx
    base_loss, base_grads = nnx.value_and_grad(loss)(base)
    other_loss, other_grads = nnx.value_and_grad(loss)(other)
    chex.assert_trees_all_close(base_loss, other_loss, atol=1e-6)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(base_grads)),
                                nnx.to_pure_dict(nnx.state(other_grads)), atol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
    from flax import nnx

    ids, pixels = make_inputs(tiny())
    f32_model = create_model(tiny(), seed=13)
    bf16_model = create_model(tiny(dtype="bfloat16", param_dtype="bfloat16"), seed=0)
    same_weights = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                nnx.to_pure_dict(nnx.state(f32_model, nnx.Param)))
    state = nnx.state(bf16_model, nnx.Param)
    nnx.replace_by_pure_dict(state, same_weights)
    nnx.update(bf16_model, state)
    f32 = f32_model(jnp.asarray(ids), jnp.asarray(pixels))
    bf16 = bf16_model(jnp.asarray(ids), jnp.asarray(pixels))
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert float(jnp.abs(f32 - bf16).max()) < 0.05 * float(jnp.abs(f32).max())


def test_wrong_image_size_is_a_clear_error():
    model = create_model(tiny())
    with pytest.raises(ValueError, match="expects 32x32"):
        model(jnp.ones((1, 3), jnp.int32), jnp.zeros((1, 1, 48, 48, 3)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny(text={"num_kv_heads": 3})
    with pytest.raises(ValueError, match="projector_type"):
        tiny(projector_type="mlp2x_relu")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny(vision_feature_layer=-7)


def test_clip_embeddings_start_at_openai_clip_scale():
    """Class and position embeddings ~ N(0, width^-1/2) (OpenAI CLIP), the patch kernel 0.02: at
    transformers' 0.02 a random tower's tokens carry almost no position after the pre-norm."""
    config = tiny()
    tower = create_model(config, seed=0).vision_tower
    width = config.vision.hidden_size
    position = np.asarray(tower.position_embedding[...])
    assert position.shape == (config.vision.num_patches + 1, width)
    np.testing.assert_allclose(position.std(), width**-0.5, rtol=0.1)
    np.testing.assert_allclose(np.asarray(tower.class_embedding[...]).std(), width**-0.5, rtol=0.25)
    np.testing.assert_allclose(np.asarray(tower.patch_embedding[...]).std(), 0.02, rtol=0.1)
