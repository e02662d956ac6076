"""LLaVA over Llama-3.1 / Mistral / Qwen2 decoders and the SigLIP tower: parity with
transformers (float32, random weights, odd sizes), KV-cache decoding and greedy generation
with a sliding window, and parameter counts of the presets."""

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp
from conftest import hf_llava_from_model
from llava_jax.convert import hf_config
from llava_jax.inference import generation
from llava_jax.models import abstract_model, count_params, create_model, get_preset
from llava_jax.models.config import PRESETS, TEXT_PRESETS, LlavaConfig, TextConfig, VisionConfig

TOL = 1e-4
# Odd sizes everywhere: 3 query heads per kv head, head_dim 20, a 397-token vocabulary, an MLP
# of 176, and a SigLIP tower whose 30 px images do not divide into 7 px patches.
TEXT = TextConfig(vocab_size=397, hidden_size=120, intermediate_size=176, num_layers=2,
                  num_heads=6, num_kv_heads=2, max_position_embeddings=256)
CLIP = VisionConfig(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=3,
                    image_size=28, patch_size=7)
SIGLIP = VisionConfig(model_type="siglip_vision_model", hidden_size=48, intermediate_size=80,
                      num_layers=3, num_heads=3, image_size=30, patch_size=7,
                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
FAMILIES = {
    # Llama 3.1: llama3 rope scaling with a pre-extension context shorter than the sequence,
    # so all three frequency bands (kept, ramped, slowed) occur.
    "llama3.1": dict(text=dict(rope_theta=500000.0, rope_scaling_factor=8.0,
                               rope_scaling_type="llama3", rope_low_freq_factor=1.0,
                               rope_high_freq_factor=4.0,
                               rope_original_max_position_embeddings=16)),
    # Mistral: a sliding window of 6 over 40-token rows.
    "mistral": dict(text=dict(model_type="mistral", sliding_window=6)),
    # Qwen2: q/k/v biases, tied embeddings, rope_theta 1e6; SigLIP, all tokens of the last layer.
    "qwen2": dict(text=dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True,
                            rope_theta=1000000.0, rms_norm_eps=1e-6),
                  vision=SIGLIP, vision_feature_layer=-1, vision_feature_select_strategy="cls_patch"),
    # NTK 'dynamic' scaling past max_position_embeddings (24 < 40 positions).
    "dynamic": dict(text=dict(rope_scaling_factor=2.0, rope_scaling_type="dynamic",
                              max_position_embeddings=24)),
}
# What each family's switch is (to check the comparison can fail without it).
SWITCH_OFF = {"llama3.1": dict(rope_scaling_factor=None), "mistral": dict(sliding_window=None),
              "qwen2": dict(rope_theta=10000.0), "dynamic": dict(rope_scaling_factor=None)}


def family_config(name, **changes) -> LlavaConfig:
    spec = dict(FAMILIES[name])
    text = {**TEXT.__dict__, **spec.pop("text")}
    return LlavaConfig(vision=spec.pop("vision", CLIP), text=TextConfig(**text),
                       image_token_index=395, pad_token_id=396, **spec).replace(**changes)


def batch(config, seed=0, length=40):
    """Two rows: an image after 3 tokens, then text up to `length`; row 1 right-padded by 7."""
    rng = np.random.default_rng(seed)
    n = config.num_image_tokens
    ids = rng.integers(3, 390, (2, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 4:4 + n] = config.image_token_index
    mask = np.ones_like(ids)
    mask[1, -7:] = 0
    size = config.vision.image_size
    return ids, mask, rng.standard_normal((2, 1, size, size, 3)).astype(np.float32)


def torch_pixels(pixels):
    return torch.from_numpy(np.ascontiguousarray(pixels[:, 0].transpose(0, 3, 1, 2)))


def hf_logits(reference, ids, mask, pixels):
    with torch.no_grad():
        return reference(input_ids=torch.from_numpy(ids).long(),
                         attention_mask=torch.from_numpy(mask).long(),
                         pixel_values=torch_pixels(pixels)).logits.numpy()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_llava_logits_match_transformers(name):
    config = family_config(name)
    model = create_model(config, seed=1)
    reference = hf_llava_from_model(model)
    assert type(reference.model.language_model).__name__.lower().startswith(
        config.text.model_type)
    ids, mask, pixels = batch(config)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels),
                            attention_mask=jnp.asarray(mask)))
    theirs = hf_logits(reference, ids, mask, pixels)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)
    # The family's switch matters at these sizes: without it the same weights disagree.
    plain = create_model(config.replace(text=SWITCH_OFF[name]), seed=1)
    off = np.asarray(plain(jnp.asarray(ids), jnp.asarray(pixels), attention_mask=jnp.asarray(mask)))
    assert np.abs(off[valid] - theirs[valid]).max() > 10 * TOL


def test_siglip_hidden_states_match_siglip_vision_model():
    """Every hidden state, and last_hidden_state (post-layernorm), of SiglipVisionModel with
    the pooling head's weights loaded (held here, never computed)."""
    config = family_config("qwen2", vision_feature_layer=(0, 1, 2, 3))
    tower = create_model(config, seed=2).vision_tower
    reference = transformers.SiglipVisionModel(hf_config.hf_vision_config(config.vision)).eval()
    from llava_jax.convert import mapping

    tensors = mapping.torch_tensors(create_model(config, seed=2))
    prefix = "vision_tower.vision_model."
    state = {name[len(prefix):]: torch.from_numpy(np.array(value, np.float32))
             for name, value in tensors.items() if name.startswith(prefix)}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("position_ids") for m in missing), (missing, unexpected)
    assert any(name.startswith("head.attention.in_proj") for name in state)
    _, _, pixels = batch(config)
    features = np.asarray(tower(jnp.asarray(pixels[:, 0])))  # [2, 16, 4 * 48]
    with torch.no_grad():
        out = reference(torch_pixels(pixels), output_hidden_states=True)
    width = config.vision.hidden_size
    assert len(out.hidden_states) == 4 and features.shape == (2, 16, 4 * width)
    for index, theirs in enumerate(out.hidden_states):
        np.testing.assert_allclose(features[..., index * width:(index + 1) * width],
                                   theirs.numpy(), atol=TOL, rtol=0, err_msg=f"layer {index}")
    last = np.asarray(tower.pooled_input(jnp.asarray(features[..., -width:])))
    np.testing.assert_allclose(last, out.last_hidden_state.numpy(), atol=TOL, rtol=0)


def test_siglip_default_strategy_drops_the_first_patch_like_transformers():
    config = family_config("qwen2", vision_feature_layer=-2, vision_feature_select_strategy="patch")
    assert config.num_image_tokens == config.vision.num_patches - 1 == 15
    model = create_model(config, seed=3)
    reference = hf_llava_from_model(model)
    ids, mask, pixels = batch(config, seed=4, length=30)
    valid = mask.astype(bool)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours[valid], hf_logits(reference, ids, mask, pixels)[valid],
                               atol=TOL, rtol=0)


def test_sliding_window_kv_cache_decode_equals_full_forward():
    """Prefill 22 tokens (the image included), then decode 3 one at a time: every step equals
    the full forward, whose window (6) the cache path applies by cache slot."""
    config = family_config("mistral")
    model = create_model(config, seed=5)
    ids, _, pixels = batch(config, seed=6, length=30)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)))
    cache = model.init_cache(2, 32)
    logits, cache = model(jnp.asarray(ids[:, :22]), jnp.asarray(pixels), cache=cache,
                          cache_index=0)
    np.testing.assert_allclose(np.asarray(logits), full[:, :22], atol=1e-5, rtol=0)
    for t in range(22, 25):
        step, cache = model(jnp.asarray(ids[:, t:t + 1]), cache=cache, cache_index=t)
        np.testing.assert_allclose(np.asarray(step[:, 0]), full[:, t], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers_with_a_sliding_window():
    """Token-identical to transformers' generate (its sliding-window cache) far past the
    window, for two prompts of different lengths in one left-padded batch."""
    config = family_config("mistral")
    model = create_model(config, seed=7)
    reference = hf_llava_from_model(model)
    ids, _, pixels = batch(config, seed=8, length=27)
    rows = [ids[0], ids[1, :22]]
    padded = np.zeros((2, 27), np.int32)
    mask = np.zeros((2, 27), np.int32)
    for index, row in enumerate(rows):
        padded[index, 27 - len(row):], mask[index, 27 - len(row):] = row, 1
    ours = generation.generate(model, padded, pixels, attention_mask=mask, max_new_tokens=12)
    for index, row in enumerate(rows):
        with torch.no_grad():
            theirs = reference.generate(
                input_ids=torch.from_numpy(row[None].astype(np.int64)),
                attention_mask=torch.ones((1, len(row)), dtype=torch.long),
                pixel_values=torch_pixels(pixels[index:index + 1]), max_new_tokens=12,
                do_sample=False)[0, len(row):].numpy()
        np.testing.assert_array_equal(ours[index, :len(theirs)], theirs)


# ----- presets ------------------------------------------------------------------------------

# Published totals of the released decoders (model cards / safetensors metadata).
RELEASED_COUNTS = {"llama-3-8b": 8_030_261_248, "llama-3.1-8b": 8_030_261_248,
                   "llama-3-70b": 70_553_706_496, "llama-3.1-70b": 70_553_706_496,
                   "mistral-7b-v0.1": 7_241_732_096, "mistral-7b-v0.2": 7_241_732_096,
                   "qwen2-0.5b": 494_032_768, "qwen2-1.5b": 1_543_714_304,
                   "qwen2-7b": 7_615_616_512, "qwen2-72b": 72_706_203_648}


def _meta_count(module_class, config) -> int:
    """transformers' parameter count from a config-only instantiation (no memory, no download)."""
    with torch.device("meta"):
        module = module_class(config)
    return sum(p.numel() for p in module.parameters())


def test_text_presets_count_what_transformers_and_the_releases_count():
    assert set(RELEASED_COUNTS) == set(TEXT_PRESETS)
    for name, text in TEXT_PRESETS.items():
        config = get_preset("tiny").replace(text=text, image_token_index=0)
        ours = count_params(abstract_model(config).language_model)
        hf = hf_config.hf_text_config(config)
        theirs = _meta_count(transformers.AutoModelForCausalLM.from_config, hf)
        assert ours == theirs == RELEASED_COUNTS[name], name


@pytest.mark.parametrize("name", ["llava-llama-3.1-8b", "llava-mistral-7b", "llava-qwen2-0.5b",
                                  "llava-qwen2-7b", "llava-llama-3-8b", "llava-v1.6-vicuna-7b",
                                  "llava-v1.6-vicuna-13b", "llava-v1.6-mistral-7b",
                                  "llama3-llava-next-8b", "llava-onevision-qwen2-0.5b",
                                  "llava-onevision-qwen2-7b"])
def test_llava_presets_count_what_transformers_counts(name):
    config = PRESETS[name]
    hf_json = hf_config.to_hf_llava(config)
    (architecture,) = hf_json["architectures"]
    assert (architecture != "LlavaForConditionalGeneration") == config.anyres
    hf = transformers.AutoConfig.for_model(**hf_json)
    assert count_params(abstract_model(config)) == _meta_count(
        getattr(transformers, architecture), hf)
    assert hf_config.from_hf_llava(hf_config.to_hf_llava(config)).replace(
        text={"head_dim": config.text.head_dim}) == config
