"""Tiled ("anyres") models: LLaVA-NeXT over CLIP and LLaVA-OneVision over SigLIP against
transformers' LlavaNextForConditionalGeneration / LlavaOnevisionForConditionalGeneration
(float32, random weights, odd sizes): logits for batches mixing image sizes, aspect ratios,
multi-image and text-only rows, and greedy generation through the KV cache."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp
from conftest import hf_llava_from_model
from llava_jax.data import anyres
from llava_jax.inference import generation
from llava_jax.models import create_model
from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig

TOL = 1e-4
TEXT = TextConfig(vocab_size=397, hidden_size=120, intermediate_size=176, num_layers=2,
                  num_heads=6, num_kv_heads=2, max_position_embeddings=512)
# 28 px tiles of 7 px patches (4 x 4 features per tile); 30 px SigLIP tiles whose last 2 px
# rows and columns no 7 px patch covers.
CLIP = VisionConfig(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=3,
                    image_size=28, patch_size=7)
SIGLIP = VisionConfig(model_type="siglip_vision_model", hidden_size=48, intermediate_size=80,
                      num_layers=2, num_heads=3, image_size=30, patch_size=7,
                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", use_head=False)
NEXT = LlavaConfig(vision=CLIP, text=TEXT, image_token_index=395, pad_token_id=396,
                   image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
                   image_grid_pinpoints=((28, 56), (56, 28), (56, 56), (84, 28), (28, 84)))
ONEVISION = LlavaConfig(vision=SIGLIP, text=TextConfig(**{**TEXT.__dict__, "model_type": "qwen2",
                                                       "qkv_bias": True}),
                        image_token_index=395, pad_token_id=396, image_aspect="anyres_max_2",
                        mm_patch_merge_type="spatial_unpad", vision_feature_layer=-1,
                        vision_feature_select_strategy="cls_patch",
                        image_grid_pinpoints=tuple((30 * i, 30 * j) for i in range(1, 4)
                                                   for j in range(1, 4)))
# Per row, the images' (height, width): wide (grid rows cropped), wider (columns cropped),
# tiny, a text-only row, tall and near-square.
NEXT_ROWS = [[(50, 90)], [(40, 90), (13, 13)], [], [(100, 45), (57, 55)]]
# OneVision: one image alone in its row is tiled (90 x 70 -> 3 x 3 tiles whose unpadded 12 x
# 10 grid is shrunk to 6 x 5); the two images sharing a row are one tile each.
ONEVISION_ROWS = [[(90, 70)], [(30, 100), (50, 20)], []]


def make_batch(config, rows_sizes, seed=0, gap=5):
    """ids, mask (right padding), our pixel_values [b, images, tiles, S, S, 3], the layout
    (index, weight), and transformers' inputs (pixel_values per image, image_sizes, ...)."""
    spec = anyres.AnyresSpec.from_config(config)
    layouts = [anyres.row_layouts(sizes, spec) for sizes in rows_sizes]
    tiles = max(layout.num_tiles for row in layouts for layout in row)
    images = max(len(row) for row in rows_sizes)
    index, weight = anyres.feature_map(layouts, spec, images=images, tiles=tiles)
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    pixels = np.zeros((len(rows_sizes), images, tiles, size, size, 3), np.float32)
    length = max(sum(l.num_tokens(spec) + gap for l in row) for row in layouts) + 2 * gap
    ids = rng.integers(3, 390, (len(rows_sizes), length)).astype(np.int32)
    mask = np.ones_like(ids)
    torch_pixels, sizes = [], []
    for b, row in enumerate(layouts):
        position = 2
        for i, layout in enumerate(row):
            pixels[b, i, :layout.num_tiles] = rng.standard_normal(
                (layout.num_tiles, size, size, 3))
            ids[b, position:position + layout.num_tokens(spec)] = config.image_token_index
            position += layout.num_tokens(spec) + gap
            tiles_chw = np.zeros((tiles, 3, size, size), np.float32)
            tiles_chw[:layout.num_tiles] = pixels[b, i, :layout.num_tiles].transpose(0, 3, 1, 2)
            torch_pixels.append(tiles_chw)
            sizes.append([layout.height, layout.width])
        mask[b, position + gap + b:] = 0
    theirs = dict(pixel_values=torch.from_numpy(np.stack(torch_pixels)),
                  image_sizes=torch.tensor(sizes))
    if config.image_aspect != "anyres":
        theirs["batch_num_images"] = torch.tensor([len(r) for r in rows_sizes if r])
    return ids, mask, pixels, (index, weight), layouts, theirs


@pytest.mark.parametrize("config, rows", [(NEXT, NEXT_ROWS), (ONEVISION, ONEVISION_ROWS)],
                         ids=["next", "onevision"])
def test_logits_match_transformers(config, rows):
    model = create_model(config, seed=1)
    reference = hf_llava_from_model(model)
    ids, mask, pixels, (index, weight), layouts, theirs = make_batch(config, rows)
    if config is ONEVISION:  # the interpolation and the one-tile multi-image path both occur
        assert layouts[0][0].shape != layouts[0][0].crop[2:] and not layouts[1][0].tiled
    else:  # letterboxed both ways: rows cropped for the wide image, columns for the tall one
        assert layouts[0][0].crop[0] > 0 and layouts[1][0].crop[1] > 0
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask),
                            image_feature_index=jnp.asarray(index),
                            image_feature_weight=jnp.asarray(weight)))
    with torch.no_grad():
        reference_logits = reference(input_ids=torch.from_numpy(ids).long(),
                                     attention_mask=torch.from_numpy(mask).long(),
                                     **theirs).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits[real], atol=TOL, rtol=0)
    # The image features matter: a shifted layout (feature k -> k + 1) breaks the match.
    shifted = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask),
                               image_feature_index=jnp.asarray(np.roll(index, 1, axis=1)),
                               image_feature_weight=jnp.asarray(weight)))
    assert np.abs(shifted[real] - reference_logits[real]).max() > 100 * TOL


def test_missing_layout_is_a_clear_error():
    model = create_model(NEXT, seed=0)
    ids, mask, pixels, _, _, _ = make_batch(NEXT, [[(40, 90)]])
    with pytest.raises(ValueError, match="image_feature_index"):
        model(jnp.asarray(ids), jnp.asarray(pixels[:, :, 0]))
    with pytest.raises(ValueError, match="image_feature_index"):
        generation.generate(model, ids, pixels, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("config, rows", [(NEXT, [[(40, 90)], [(100, 30)], []]),
                                          (ONEVISION, ONEVISION_ROWS)],
                         ids=["next", "onevision"])
def test_greedy_generation_matches_transformers(config, rows):
    """Token-identical to transformers' generate, row by row, for a right-padded batch that
    generate left-aligns (the layout is indexed by placeholder number, so it survives);
    `stream` yields the same tokens."""
    model = create_model(config, seed=3)
    reference = hf_llava_from_model(model)
    ids, mask, pixels, (index, weight), layouts, _ = make_batch(config, rows, seed=4)
    ours = generation.generate(model, ids, pixels, attention_mask=mask,
                               image_feature_index=index, image_feature_weight=weight,
                               max_new_tokens=10, eos_token_id=-1)
    assert ours.shape == (len(rows), 10)
    streamed = np.stack(list(generation.stream(
        model, ids, pixels, attention_mask=mask, image_feature_index=index,
        image_feature_weight=weight, max_new_tokens=10, eos_token_id=-1)), axis=1)
    np.testing.assert_array_equal(streamed, ours)
    for b, row in enumerate(layouts):
        length = int(mask[b].sum())
        inputs = dict(input_ids=torch.from_numpy(ids[b:b + 1, :length]).long(),
                      attention_mask=torch.ones((1, length), dtype=torch.long))
        if row:  # this row's images: their tiles channels first, sizes, (OneVision) count
            inputs.update(pixel_values=torch.from_numpy(np.ascontiguousarray(
                pixels[b, :len(row)].transpose(0, 1, 4, 2, 3))),
                image_sizes=torch.tensor([[l.height, l.width] for l in row]))
            if config is ONEVISION:
                inputs["batch_num_images"] = torch.tensor([len(row)])
        with torch.no_grad():
            expected = reference.generate(**inputs, max_new_tokens=10, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, length:].numpy()
        np.testing.assert_array_equal(ours[b], expected)
