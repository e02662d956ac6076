"""data/anyres.py: the tiled layout's numbers equal transformers' (its processors' placeholder
counts, its image processors' tiles), for many sizes and aspect ratios, tiny and extreme."""

import numpy as np
import pytest
from PIL import Image
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil)

from conftest import hf_onevision_processor
from llava_jax.data import anyres
from llava_jax.data.testing import build_test_tokenizer
from llava_jax.models.config import LlavaConfig, VisionConfig

# The released checkpoints' grids: LLaVA-NeXT (336 px CLIP tiles) and OneVision (384 px SigLIP).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
EXTREME = [(1, 1), (1, 2), (2, 1), (1, 5000), (5000, 1), (3, 4000), (4000, 3), (336, 336),
           (336, 672), (337, 673), (383, 385), (384, 384), (480, 640), (640, 480), (1008, 336),
           (2000, 2000), (4032, 3024), (7, 9999)]


def sizes(count=1500, seed=0):
    rng = np.random.default_rng(seed)
    return EXTREME + [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(count)]


@pytest.fixture(scope="module")
def processors():
    tokenizer = build_test_tokenizer()
    next_processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=NEXT_PINPOINTS,
                                                   size={"shortest_edge": 336},
                                                   crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    onevision = hf_onevision_processor(
        image_processor=LlavaOnevisionImageProcessorPil(), tokenizer=tokenizer,
        num_image_tokens=729, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9")
    return next_processor, onevision


def test_placeholder_counts_equal_the_processors(processors):
    next_processor, onevision = processors
    next_spec = anyres.AnyresSpec(tuple(map(tuple, NEXT_PINPOINTS)), 336, 24)
    onevision_spec = anyres.AnyresSpec(tuple(map(tuple, ONEVISION_PINPOINTS)), 384, 27,
                                       budget=9, tile_single_only=True)
    shrunk = 0
    for height, width in sizes():
        # LLaVA-NeXT's processor counts the CLS it then drops ("default" strategy).
        expected = next_processor._get_number_of_features(height, width, 336, 336) - 1
        assert anyres.number_of_image_tokens(height, width, next_spec) == expected, (height, width)
        expected = onevision._get_number_of_features(height, width, 384, 384)
        layout = anyres.image_layout(height, width, onevision_spec)
        assert layout.num_tokens(onevision_spec) == expected, (height, width)
        shrunk += layout.shape != layout.crop[2:]
    assert shrunk > 100  # the anyres_max interpolation was exercised
    # Multi-image rows: one tile plus a newline, whatever the size.
    assert anyres.row_layouts([(5, 3000), (50, 60)], onevision_spec)[0].num_tokens(
        onevision_spec) == 729 + 1


def test_feature_map_fills_exactly_the_placeholders():
    spec = anyres.AnyresSpec(((28, 56), (56, 28), (56, 56)), 28, 4, budget=1)
    rows = [anyres.row_layouts(s, spec) for s in ([(40, 90)], [(9, 9)], [])]
    index, weight = anyres.feature_map(rows, spec, images=1, tiles=5)
    filled = (weight.sum(axis=2) > 0).sum(axis=1)
    assert filled.tolist() == [rows[0][0].num_tokens(spec), rows[1][0].num_tokens(spec), 0]
    np.testing.assert_allclose(weight.sum(axis=2)[weight.sum(axis=2) > 0], 1, atol=1e-6)
    newline = 1 * 5 * 16
    assert index.max() == newline and (index[0, :16, 0] == np.arange(16)).all()
    with pytest.raises(ValueError, match="tile slots"):
        anyres.feature_map(rows, spec, images=1, tiles=2)


@pytest.mark.parametrize("height, width", [(40, 90), (100, 30), (13, 13), (57, 55), (1, 200)])
def test_tiles_equal_the_image_processor(height, width):
    """Our tiling of the uint8 image (PIL bicubic as the processor's resample) gives the
    processor's tiles: compare them normalised by its own mean / std."""
    rng = np.random.default_rng(height * width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    pinpoints = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints,
                                           size={"shortest_edge": 28},
                                           crop_size={"height": 28, "width": 28},
                                           image_mean=[0, 0, 0], image_std=[1, 1, 1])
    theirs = processor(images=[image], return_tensors="np")["pixel_values"][0]
    spec = anyres.AnyresSpec(tuple(map(tuple, pinpoints)), 28, 4)
    layout = anyres.image_layout(height, width, spec)

    def resize(pixels, size):
        return np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.Resampling.BICUBIC))

    tiles = anyres.tile_image(np.asarray(image), layout, spec, resize)
    assert len(tiles) == layout.num_tiles == theirs.shape[0]
    ours = np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("changes, field", [
    (dict(image_aspect="anyres"), "mm_patch_merge_type"),
    (dict(image_aspect="anyres", mm_patch_merge_type="spatial_unpad"), "image_grid_pinpoints"),
    (dict(image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
          image_grid_pinpoints=((28, 50),)), "image_grid_pinpoints"),
    (dict(image_aspect="anyres_max_0", mm_patch_merge_type="spatial_unpad",
          image_grid_pinpoints=((28, 56),)), "image_aspect"),
    (dict(image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
          image_grid_pinpoints=((28, 56),), vision_feature_select_strategy="cls_patch"),
     "vision_feature_select_strategy"),
    (dict(image_grid_pinpoints=((28, 56),)), "image_grid_pinpoints"),
    (dict(mm_patch_merge_type="spatial"), "mm_patch_merge_type"),
])
def test_bad_layout_settings_name_the_field(changes, field):
    vision = VisionConfig(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=3,
                          image_size=28, patch_size=7)
    with pytest.raises(ValueError, match=field):
        LlavaConfig(vision=vision, **changes)


def test_config_round_trips_and_counts_tiles():
    vision = VisionConfig(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=3,
                          image_size=28, patch_size=7)
    config = LlavaConfig(vision=vision, image_aspect="anyres_max_4",
                         mm_patch_merge_type="spatial_unpad",
                         image_grid_pinpoints=((28, 56), (84, 56)))
    assert LlavaConfig.from_dict(config.to_dict()) == config
    assert config.max_tiles == 1 + 3 * 2 == anyres.AnyresSpec.from_config(config).max_tiles
