"""Training tiled (anyres) models: the data pipeline tiles each image as the model's processor
does (a packed row's images sharing its tile slots), bad and degenerate images are counted
skips, and a tiny LLaVA-NeXT trains on the demo images, its loss falling, and resumes."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from llava_jax import checkpoint as ckpt
from llava_jax.data import anyres, batching, default_data_config
from llava_jax.data.pipeline import SampleProcessor, make_dataset, make_tiling
from llava_jax.data.processor import PREPROCESSOR_FILE, Processor, default_preprocessor_config
from llava_jax.data.testing import build_test_tokenizer, write_dataset
from llava_jax.models import create_model, get_preset
from llava_jax.training import optim
from llava_jax.training.trainer import Trainer
from test_models_anyres import NEXT, ONEVISION
from test_train import TINY_MODEL, demo_data, flat, tiny_config  # noqa: F401 (fixture)

PINPOINTS = ((16, 32), (32, 16), (32, 32))  # the tiny demo model's (16 px tiles)
SIZES = {"wide.png": (90, 50), "tall.png": (45, 100), "square.png": (55, 57),
         "thin.png": (64, 2)}  # file -> (width, height)


def photo(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def records():
    """A one-image sample, a two-image sample, a text-only one (ids name them)."""
    ask = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "A cat."}]  # noqa: E731
    return [
        {"id": "one", "image": "wide.png", "conversations": ask("<image>\nWhat is it?")},
        {"id": "two", "image": ["tall.png", "square.png"],
         "conversations": ask("<image>\n<image>\nWhich is the cat?")},
        {"id": "text", "conversations": ask("Say something.")},
    ]


def tokenizer_and_config(base):
    tokenizer = build_test_tokenizer()
    text = dataclasses.replace(base.text, vocab_size=len(tokenizer))
    config = base.replace(text=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                          pad_token_id=tokenizer.pad_token_id)
    return tokenizer, config


@pytest.mark.parametrize("base", [NEXT, ONEVISION], ids=["next", "onevision"])
def test_packed_tiled_rows_give_the_processors_image_features(base, tmp_path):
    """Each image's placeholders in a packed training row receive exactly the features the
    processor's inputs give the same image (tiles, unpadding, newlines, OneVision's
    interpolation and its one-tile multi-image rule)."""
    tokenizer, config = tokenizer_and_config(base)
    images = {name: photo(w, h, seed) for seed, (name, (w, h)) in enumerate(SIZES.items())}
    paths = write_dataset(str(tmp_path), records(), images)
    data = default_data_config(2)
    data.json_paths, data.image_roots = (paths["json"],), (paths["image_root"],)
    data.max_tiles_per_row = 16
    tiling = make_tiling(config, data)
    process = SampleProcessor(data, tokenizer, num_image_tokens=config.num_image_tokens,
                              image_token_index=config.image_token_index,
                              image_size=config.vision.image_size, tiling=tiling)
    one, two, text = (process(i, r) for i, r in enumerate(records()))
    spec = tiling.spec
    assert [layout.tiled for layout in two["layouts"]] == [base is NEXT] * 2
    assert one["num_tiles"] > 1 and text["num_tiles"] == 0
    counts = [layout.num_tokens(spec) for layout in one["layouts"] + two["layouts"]]
    # Every image its own count, from its size (OneVision: both images of a pair get one tile).
    assert len(set(counts)) == (3 if base is NEXT else 2)
    length = 512
    batch = batching.assemble_batch([[one, two], [text]], batch_size=2, buckets=(length,),
                                    max_images_per_row=16, image_size=config.vision.image_size,
                                    pad_id=config.pad_token_id, tiled=spec)
    assert batch["pixel_values"].shape == (2, 16, 1, *(config.vision.image_size,) * 2, 3)
    assert batch["image_mask"][0].sum() == one["num_tiles"] + two["num_tiles"]
    assert not batch["image_mask"][1].any()

    model = create_model(config, seed=0)
    embeds = np.asarray(model.embed(*(jnp.asarray(batch[k]) for k in (
        "input_ids", "pixel_values", "image_mask", "image_feature_index",
        "image_feature_weight"))))
    processor = Processor(config, tokenizer)
    ids = batch["input_ids"][0]
    for segment, names in ((1, ["wide.png"]), (2, ["tall.png", "square.png"])):
        where = (batch["segment_ids"][0] == segment) & (ids == config.image_token_index)
        alone = processor(text=["<image>\n" * len(names)],
                          images=[[Image.open(os.path.join(paths["image_root"], n)) for n in names]])
        expected = np.asarray(model.embed(**{k: jnp.asarray(v) for k, v in alone.items()
                                             if k != "attention_mask"}))
        mine = alone["input_ids"][0] == config.image_token_index
        assert where.sum() == mine.sum() > 0
        np.testing.assert_allclose(embeds[0][where], expected[0][mine], atol=1e-5, rtol=0)
    # The map matters: the second sample's features are not the first's.
    assert not np.allclose(embeds[0][(batch["segment_ids"][0] == 2) & (ids == config.image_token_index)][:4],
                           embeds[0][(batch["segment_ids"][0] == 1) & (ids == config.image_token_index)][:4])


def test_bad_thin_and_oversized_images_are_counted_skips(tmp_path):
    tokenizer, config = tokenizer_and_config(NEXT)
    images = {name: photo(w, h, seed) for seed, (name, (w, h)) in enumerate(SIZES.items())}
    images["broken.png"] = b"\x89PNG not really"
    ask = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    rows = [{"id": name, "image": name, "conversations": ask}
            for name in ("wide.png", "thin.png", "broken.png", "missing.png")]
    rows.append({"id": "pair", "image": ["wide.png", "square.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "Two."}]})
    paths = write_dataset(str(tmp_path), rows, images)
    data = default_data_config(2)
    data.json_paths, data.image_roots = (paths["json"],), (paths["image_root"],)
    data.buckets, data.max_length, data.shuffle = (512,), 512, False
    data.max_tiles_per_row = 6  # one image at the largest pinpoint (5 tiles), not two
    iterator = make_dataset(data, tokenizer, num_image_tokens=config.num_image_tokens,
                            image_token_index=config.image_token_index,
                            image_size=config.vision.image_size, batch_size=1,
                            shard_index=0, shard_count=1, tiling=make_tiling(config, data))
    batches = list(iterator)
    assert len(batches) == 1 and batches[0]["image_mask"].sum() == 5  # wide.png: base + 2x2
    assert iterator.skip_counts == {"tiny_image": 1, "bad_image": 1, "missing_image": 1,
                                    "too_many_images": 1}


@pytest.fixture()
def tiled_demo(demo_data, tmp_path):  # noqa: F811
    """The demo's first 40 stage-2 samples, every third image cropped to a wide or tall
    rectangle, so rows mix grids, and the config of a tiny random LLaVA-NeXT for them."""
    with open(demo_data["stage2_json"]) as handle:
        rows = json.load(handle)
    crops = tmp_path / "crops"
    crops.mkdir()
    for index, row in enumerate(rows):
        if index % 3 == 0 and "image" in row:
            image = Image.open(os.path.join(demo_data["image_root"], row["image"]))
            box = (0, 0, 64, 24) if index % 2 else (0, 0, 28, 64)
            row["image"] = f"crop{index}.png"
            image.crop(box).save(crops / row["image"])
    # The run's tokenizer folder holds a preprocessor_config.json (bilinear resampling),
    # which the pipeline must follow and the workdir carry.
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(demo_data["tokenizer_dir"], tokenizer_dir)
    settings = default_preprocessor_config(get_preset("tiny-next").replace(
        vision=dataclasses.replace(get_preset("tiny-next").vision, image_size=16),
        image_grid_pinpoints=PINPOINTS))
    (tokenizer_dir / PREPROCESSOR_FILE).write_text(json.dumps(dict(settings, resample=2)))
    data = dict(demo_data, stage2_json=str(tmp_path / "stage2.json"),
                tokenizer_dir=str(tokenizer_dir))
    (tmp_path / "stage2.json").write_text(json.dumps(rows))

    def config(**optim):
        c = tiny_config(data, **optim)
        c.data.image_roots = (demo_data["image_root"], str(crops))
        c.model.overrides = ml_collections.ConfigDict(dict(
            TINY_MODEL, image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
            image_grid_pinpoints=PINPOINTS))
        c.data.buckets, c.data.max_length = (192,), 192
        return c
    return config


def test_tiny_next_model_trains_and_resumes(tiled_demo, tmp_path):
    straight = Trainer(tiled_demo(total_steps=6), str(tmp_path / "straight"))
    result = straight.run()
    losses = [loss for _, loss in result["history"]]
    assert result["step"] == 6 and losses[-1] < losses[0] - 0.2, losses
    assert straight.tiling.tiles_per_row == 5  # base + the 2 x 2 grid of 32 x 32
    assert straight.tiling.image_processor.resample == 2  # the folder's preprocessor config

    config = tiled_demo(total_steps=6)
    config.max_steps = 3
    assert Trainer(config, str(tmp_path / "resumed")).run()["step"] == 3
    config.max_steps = -1
    resumed = Trainer(config, str(tmp_path / "resumed"))
    again = resumed.run()
    assert again["step"] == 6 and again["history"][-1] == result["history"][-1]
    a = flat(optim.merge_params(straight.trainable, straight.frozen))
    b = flat(optim.merge_params(resumed.trainable, resumed.frozen))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert "image_newline" in a  # trained in stage 2 with the projector and the LLM
    # The workdir is a tiled model directory with a processor.
    loaded = ckpt.load_pretrained(tmp_path / "resumed")
    assert loaded.config.anyres and loaded.processor.image_processor.resample == 2
    np.testing.assert_array_equal(np.asarray(loaded.model.image_newline[...]), a["image_newline"])
