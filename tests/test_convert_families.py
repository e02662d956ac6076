"""Conversion of transformers' LlavaForConditionalGeneration over Llama-3.1 / Mistral / Qwen2
text configs and CLIP / SigLIP vision configs: bit-exact round trips, logits, clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from llava_jax import load_pretrained
from llava_jax.convert import hf_config, hf_to_jax, jax_to_hf

TOL = 1e-4
TEXT = dict(vocab_size=397, hidden_size=120, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=396)
CLIP = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=3, image_size=28, patch_size=7)
SIGLIP = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
              image_size=30, patch_size=7)


def released_style_config(name: str) -> transformers.LlavaConfig:
    """Configs written the way transformers (and the hub checkpoints) write them, not by us."""
    if name == "llama3.1":
        text = transformers.LlamaConfig(**TEXT, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))
        return transformers.LlavaConfig(text_config=text, vision_config=CLIP,
                                        image_token_index=395)
    if name == "mistral":
        text = transformers.MistralConfig(**TEXT, sliding_window=6, head_dim=20,
                                          rope_parameters=dict(rope_type="default",
                                                               rope_theta=1000000.0))
        vision = transformers.SiglipVisionConfig(**SIGLIP, vision_use_head=True)
        return transformers.LlavaConfig(text_config=text, vision_config=vision,
                                        image_token_index=395, vision_feature_layer=-1,
                                        vision_feature_select_strategy="full")
    text = transformers.Qwen2Config(**TEXT, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                    rope_parameters=dict(rope_type="default", rope_theta=1e6))
    vision = transformers.SiglipVisionConfig(**SIGLIP, vision_use_head=False)
    return transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=395,
                                    vision_feature_layer=-2, tie_word_embeddings=True)


def read_all(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in tensors.items()}


@pytest.mark.parametrize("name", ["llama3.1", "mistral", "qwen2"])
def test_round_trip_is_bit_exact_and_logits_match(name, tmp_path):
    torch.manual_seed(0)
    reference = transformers.LlavaForConditionalGeneration(released_style_config(name)).eval()
    reference.save_pretrained(tmp_path / "hf")
    hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"), progress=False)
    jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "back"), progress=False)
    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for key, tensor in back.items():
        assert torch.equal(tensor, original[key]), key
    if name == "mistral":
        assert any(".head.attention.in_proj_weight" in key for key in back)  # SigLIP head kept
    if name == "qwen2":
        assert "lm_head.weight" not in back and "language_model.lm_head.weight" not in back
    # The exported config describes the same model to transformers.
    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    for part, keys in (("text_config", ["model_type", "rope_parameters", "sliding_window",
                                        "tie_word_embeddings", "num_key_value_heads"]),
                       ("vision_config", ["model_type", "vision_use_head", "image_size"])):
        assert {k: before[part].get(k) for k in keys} == {k: after[part].get(k) for k in keys}
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_index"):
        assert before[key] == after[key]
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info

    loaded = load_pretrained(tmp_path / "jax")
    assert loaded.config.text.model_type == {"llama3.1": "llama"}.get(name, name)
    config = loaded.config
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 390, (1, 36)).astype(np.int32)
    ids[0, 2:2 + config.num_image_tokens] = config.image_token_index
    size = config.vision.image_size
    pixels = rng.standard_normal((1, 1, size, size, 3)).astype(np.float32)
    ours = np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(pixels)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(
            pixels[:, 0].transpose(0, 3, 1, 2).copy())).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                        "rope_theta": 1e4}), "rope_type"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "longrope",
                                                        "rope_theta": 1e4}), "longrope"),
    (lambda c: c["text_config"].update(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (lambda c: c["text_config"].update(model_type="gemma"), "text_config.model_type"),
    (lambda c: c["vision_config"].update(model_type="dinov2"), "vision_config.model_type"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
    (lambda c: c["text_config"].update(model_type="qwen2", use_sliding_window=True,
                                       sliding_window=8, max_window_layers=1),
     "use_sliding_window"),
    (lambda c: c["text_config"].update(layer_types=["full_attention", "sliding_attention"]),
     "layer_types"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                        "rope_theta": 1e4}), "low_freq_factor"),
])
def test_unsupported_config_values_fail_naming_the_field(edit, field):
    config = released_style_config("llama3.1").to_dict()
    edit(config)
    with pytest.raises(hf_config.ConfigError, match=field):
        hf_config.from_hf_llava(config)


def test_export_refuses_switches_the_family_cannot_express():
    from llava_jax.models import get_preset

    for text, field in (({"qkv_bias": True}, "qkv_bias"), ({"sliding_window": 8}, "sliding_window"),
                        ({"model_type": "qwen2"}, "qkv_bias=False"),
                        ({"model_type": "mistral", "mlp_bias": True}, "mlp_bias")):
        with pytest.raises(hf_config.ConfigError, match=field):
            hf_config.to_hf_llava(get_preset("tiny", text=text))


def test_qwen2_with_sliding_window_on_no_layer_converts():
    """use_sliding_window with max_window_layers >= num_hidden_layers slides no layer."""
    config = released_style_config("qwen2").to_dict()
    config["text_config"].update(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    config["text_config"].pop("layer_types", None)
    assert hf_config.from_hf_llava(config).text.sliding_window is None
