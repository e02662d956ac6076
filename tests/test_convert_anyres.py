"""Conversion of transformers' LlavaNextForConditionalGeneration and
LlavaOnevisionForConditionalGeneration directories, both ways: bit-exact tensors (with
image_newline), the layout fields of config.json, the processor files carried over, and the
loaded model + processor against transformers' model + processor on real photographs."""

import json

import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil)

from conftest import hf_onevision_processor
from llava_jax import generate, load_pretrained
from llava_jax.convert import hf_config, hf_to_jax, jax_to_hf
from llava_jax.data.testing import build_byte_level_tokenizer, build_test_tokenizer

TOL = 1e-4


def text_config(tokenizer, **changes):
    return dict(vocab_size=len(tokenizer), hidden_size=120, intermediate_size=176,
                num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, **changes)


def family(name):
    """(transformers config, image processor, tokenizer, transformers processor) written the
    way the released llava-hf checkpoints are, at toy size."""
    if name == "next":
        tokenizer = build_test_tokenizer()
        pinpoints = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
        config = transformers.LlavaNextConfig(
            text_config=transformers.LlamaConfig(**text_config(tokenizer)),
            vision_config=transformers.CLIPVisionConfig(
                hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=3, image_size=28, patch_size=7),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=pinpoints)
        images = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints,
                                            size={"shortest_edge": 28},
                                            crop_size={"height": 28, "width": 28})
        processor = transformers.LlavaNextProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=7,
            vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return config, images, tokenizer, processor
    tokenizer = build_byte_level_tokenizer("qwen2")
    pinpoints = [[30 * i, 30 * j] for i in range(1, 4) for j in range(1, 4)]
    config = transformers.LlavaOnevisionConfig(
        text_config=transformers.Qwen2Config(**text_config(tokenizer), rms_norm_eps=1e-6),
        vision_config=transformers.SiglipVisionConfig(
            hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
            image_size=30, patch_size=7, vision_use_head=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_2")
    images = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pinpoints,
                                             size={"height": 30, "width": 30},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = hf_onevision_processor(image_processor=images, tokenizer=tokenizer,
                                       num_image_tokens=16, vision_feature_select_strategy="full",
                                       vision_aspect_ratio="anyres_max_2")
    return config, images, tokenizer, processor


def read_all(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in tensors.items()}


PHOTOS = (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee, skimage.data.rocket)


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_round_trip_processor_and_logits(name, tmp_path):
    config, images, tokenizer, processor = family(name)
    torch.manual_seed(0)
    architecture = getattr(transformers, config.architectures[0] if config.architectures else
                           {"next": "LlavaNextForConditionalGeneration",
                            "onevision": "LlavaOnevisionForConditionalGeneration"}[name])
    reference = architecture(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    images.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"), progress=False)
    jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "back"), progress=False)

    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "back")
    assert "image_newline" in back and sorted(back) == sorted(original)
    for key, tensor in back.items():
        assert torch.equal(tensor, original[key]), key
    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    keys = ["model_type", "architectures", "image_grid_pinpoints", "vision_feature_layer",
            "vision_feature_select_strategy", "image_token_index"]
    keys += ["vision_aspect_ratio"] if name == "onevision" else []
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    assert (json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
            == json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text()))
    _, info = architecture.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info

    # The loaded processor equals transformers': a tiled photo alone in its row, two photos
    # sharing a row (OneVision: one tile each), and a text-only row, in one batch.
    loaded = load_pretrained(tmp_path / "jax")
    assert loaded.config.anyres and loaded.processor is not None
    photos = [Image.fromarray(load()) for load in PHOTOS]
    texts = ["USER: <image>\nWhat is in the image? ASSISTANT:",
             "<image> one, <image> two: which is the cat?", "A row with no image at all."]
    rows = [[photos[0]], [photos[1], photos[2]], []]
    batch = loaded.processor(text=texts, images=rows)
    # OneVision's processor needs the rows to see which images share one.
    theirs = processor(text=texts, images=rows if name == "onevision" else
                       [p for row in rows for p in row], padding=True, return_tensors="pt")
    np.testing.assert_array_equal(batch["input_ids"], theirs["input_ids"].numpy())
    np.testing.assert_array_equal(batch["attention_mask"], theirs["attention_mask"].numpy())
    flat = [(b, s) for b, row in enumerate(rows) for s in range(len(row))]
    for k, (b, s) in enumerate(flat):
        tiles = int(theirs["pixel_values"].shape[1])
        ours = batch["pixel_values"][b, s].transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours[:tiles], theirs["pixel_values"][k].numpy(), atol=1e-5,
                                   rtol=0)
        assert not ours[tiles:].any()

    logits = np.asarray(loaded.model(**batch))
    with torch.no_grad():
        expected = reference(**theirs).logits.numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=TOL, rtol=0)
    tokens = generate(loaded.model, **batch, max_new_tokens=3)
    assert tokens.shape[0] == 3


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(image_grid_pinpoints=[[28, 50]]), "image_grid_pinpoints"),
    (lambda c: c.update(image_grid_pinpoints="many"), "image_grid_pinpoints"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda c: c.update(model_type="llava_next_video"), "model_type"),
])
def test_unsupported_next_values_fail_naming_the_field(edit, field):
    config = family("next")[0].to_dict()
    edit(config)
    with pytest.raises(hf_config.ConfigError, match=field):
        hf_config.from_hf_llava(config)


@pytest.mark.parametrize("aspect", ["anyres", "pad", "anyres_max_0", "anyres_max_9x"])
def test_unsupported_vision_aspect_ratio_fails_naming_the_field(aspect):
    config = family("onevision")[0].to_dict()
    config["vision_aspect_ratio"] = aspect
    with pytest.raises(hf_config.ConfigError, match="vision_aspect_ratio"):
        hf_config.from_hf_llava(config)
