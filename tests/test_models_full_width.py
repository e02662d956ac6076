"""Parity at real widths: CLIP ViT-L/14-336 whole, and a LLaMA with 7B widths (2 layers)."""

import gc

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from conftest import torch_module_state
from llava_jax.convert import hf_config, mapping
from llava_jax.models import LlavaConfig, TextConfig, create_model, get_preset

TOL = 1e-4
SMALL_TEXT = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                        num_heads=2, num_kv_heads=2)


def test_clip_vit_l14_336_full_size_matches_transformers():
    config = LlavaConfig(vision=get_preset("llava-v1.5-7b").vision, text=SMALL_TEXT,
                         image_token_index=0, pad_token_id=None)
    model = create_model(config, seed=0)
    vision_json = hf_config.to_hf_llava(config)["vision_config"]
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision_json)).float().eval()
    state = torch_module_state(mapping.torch_tensors(model), {"vision_tower.vision_model.": ""})
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not [m for m in missing if "position_ids" not in m] and not unexpected
    pixels = np.random.default_rng(0).standard_normal((1, 336, 336, 3)).astype(np.float32)
    ours = np.asarray(model.vision_tower(jnp.asarray(pixels)))
    with torch.no_grad():
        states = reference(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                           output_hidden_states=True).hidden_states
    assert ours.shape == (1, 576, 1024)
    np.testing.assert_allclose(ours, states[-2][:, 1:].numpy(), atol=TOL, rtol=0)


def test_llama_7b_widths_two_layers_matches_transformers():
    text = TextConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=2,
                      num_heads=32, num_kv_heads=32, max_position_embeddings=4096)
    config = get_preset("tiny").replace(text=text, image_token_index=31999, pad_token_id=0)
    model = create_model(config, seed=0)
    llama_json = hf_config.to_hf_llava(config)["text_config"]
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_json)).float().eval()
    state = torch_module_state(
        {k: v for k, v in mapping.torch_tensors(model).items() if k.startswith("language_model.")},
        {"language_model.": ""})
    missing, unexpected = reference.load_state_dict(state, strict=True)
    del state
    gc.collect()
    ids = np.random.default_rng(1).integers(3, 32000, (2, 24)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
