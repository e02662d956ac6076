"""The grain pipeline: batch contract, packing, modality groups, determinism, resume, shards,
bad data."""

import json
import re

import numpy as np
import pytest
from absl import flags
from PIL import Image

from llava_jax.data import DataError, default_data_config, make_dataset, num_samples, skip_counts
from llava_jax.data.image import preprocess_image
from llava_jax.data.testing import build_test_tokenizer, numbered_records, solid_image, write_dataset

IMAGE_SIZE, NUM_IMAGE_TOKENS = 16, 4
flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags


@pytest.fixture(scope="module")
def tokenizer():
    return build_test_tokenizer()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    records, images = numbered_records(40, text_only_every=6)
    return write_dataset(str(tmp_path_factory.mktemp("data")), records, images)


def config_for(paths, **overrides):
    config = default_data_config(stage=2)
    config.json_paths = (paths["json"],)
    config.image_roots = (paths["image_root"],)
    config.aspect = "square"
    config.max_length = 96
    config.buckets = (64, 96)
    config.max_images_per_row = 2
    config.pool_batches = 2
    config.use_index_cache = False
    config.update(overrides)
    return config


def batches(config, tokenizer, limit=None, batch_size=3, seed=0, shard=(0, 1), **kw):
    iterator = make_dataset(config, tokenizer, num_image_tokens=NUM_IMAGE_TOKENS,
                            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                            image_size=IMAGE_SIZE, batch_size=batch_size, seed=seed,
                            shard_index=shard[0], shard_count=shard[1], **kw)
    out = []
    for batch in iterator:
        out.append(batch)
        if limit and len(out) == limit:
            break
    return out, iterator


def segments(batch, tokenizer):
    """[(row, segment id, sample index from its answer, slice)] for every packed sample."""
    found = []
    for row in range(batch["input_ids"].shape[0]):
        for segment in np.unique(batch["segment_ids"][row]):
            if segment == 0:
                continue
            where = np.flatnonzero(batch["segment_ids"][row] == segment)
            labels = batch["labels"][row, where]
            answer = tokenizer.decode(labels[labels != -100])
            found.append((row, int(segment), int(re.search(r"item(\d+)", answer).group(1)), where))
    return found


def test_batch_contract(dataset, tokenizer):
    out, _ = batches(config_for(dataset), tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    seen = []
    for batch in out:
        assert set(batch) == {"input_ids", "labels", "segment_ids", "positions", "pixel_values", "image_mask"}
        b, length = batch["input_ids"].shape
        assert b == 3 and length in (64, 96)
        for key in ("input_ids", "labels", "segment_ids", "positions"):
            assert batch[key].dtype == np.int32 and batch[key].shape == (b, length)
        assert batch["pixel_values"].shape == (b, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert batch["pixel_values"].dtype == np.float32 and batch["image_mask"].dtype == bool
        pad = batch["segment_ids"] == 0
        assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all() and (batch["labels"][pad] == -100).all()
        # Modality groups: a batch is all-image or all-text.
        has_images = [(batch["input_ids"][r] == image_id).any() for r in range(b) if (~pad[r]).any()]
        assert all(has_images) or not any(has_images)
        for row, segment, index, where in segments(batch, tokenizer):
            seen.append(index)
            assert (np.diff(where) == 1).all()  # contiguous
            np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
            assert batch["labels"][row, where[0]] == -100  # no target across a segment start
        for row in range(b):
            # Image runs appear in the order of the real slots: slot k holds the image of the
            # k-th image-bearing segment of the row.
            image_segments = [(seg, idx) for r, seg, idx, where in segments(batch, tokenizer)
                              if r == row and (batch["input_ids"][row, where] == image_id).any()]
            assert batch["image_mask"][row].sum() == len(image_segments)
            assert (batch["input_ids"][row] == image_id).sum() == NUM_IMAGE_TOKENS * len(image_segments)
            for slot, (_, index) in enumerate(sorted(image_segments)):
                np.testing.assert_array_equal(batch["pixel_values"][row, slot],
                                              preprocess_image(solid_image(index), IMAGE_SIZE, "square"))
            assert not batch["pixel_values"][row, len(image_segments):].any()
    assert sorted(seen) == list(range(40))  # one epoch: every sample exactly once
    tokens = sum((b["segment_ids"] > 0).sum() for b in out)
    assert tokens / sum(b["segment_ids"].size for b in out) > 0.6  # packed, not one per row


def test_bucketing_without_packing_puts_one_sample_per_row(dataset, tokenizer):
    out, _ = batches(config_for(dataset, packing=False, buckets=(48, 64, 96)), tokenizer)
    for batch in out:
        assert batch["segment_ids"].max() <= 1
        lengths = (batch["segment_ids"] > 0).sum(axis=1)
        length = batch["input_ids"].shape[1]
        smaller = [b for b in (48, 64, 96) if b < length]
        assert all(n <= length for n in lengths) and all(max(lengths) > b for b in smaller)
    assert sum((b["segment_ids"] > 0).any(axis=1).sum() for b in out) == 40


def stream_of_ids(out, tokenizer):
    return [index for batch in out for _, _, index, _ in segments(batch, tokenizer)]


def test_same_seed_same_batches_other_seed_other_order_and_epochs_reshuffle(dataset, tokenizer):
    config = config_for(dataset, num_epochs=2)
    first, _ = batches(config, tokenizer, seed=3)
    again, _ = batches(config, tokenizer, seed=3)
    other, _ = batches(config, tokenizer, seed=4)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    ids = stream_of_ids(first, tokenizer)
    assert ids != stream_of_ids(other, tokenizer)
    assert sorted(ids) == sorted(list(range(40)) * 2)
    # Epoch 2 is a different permutation (the pools straddle the boundary a little).
    assert ids[:20] != ids[40:60]


@pytest.mark.parametrize("worker_count", [0, 1])
def test_restore_mid_epoch_continues_with_exactly_the_next_batch(dataset, tokenizer, worker_count):
    # The reference run is in-process: grain workers must not change the batches either.
    full, _ = batches(config_for(dataset, num_epochs=2), tokenizer, seed=1)
    config = config_for(dataset, worker_count=worker_count, num_epochs=2)
    head, iterator = batches(config, tokenizer, limit=5, seed=1)
    state = json.loads(json.dumps(iterator.get_state()))  # what grain.checkpoint writes
    assert state["pools"]["pools"], "the test must resume with samples pooled for packing"
    iterator.close()
    fresh = make_dataset(config, tokenizer, num_image_tokens=NUM_IMAGE_TOKENS,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_size=IMAGE_SIZE, batch_size=3, seed=1, shard_index=0, shard_count=1)
    fresh.set_state(state)
    rest = list(fresh)
    fresh.close()
    assert len(head) + len(rest) == len(full)
    for a, b in zip(full, head + rest):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_shards_are_disjoint_and_cover_the_data(dataset, tokenizer):
    seen = []
    for shard in range(3):
        out, _ = batches(config_for(dataset), tokenizer, shard=(shard, 3))
        seen.append(set(stream_of_ids(out, tokenizer)))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(range(40))
    assert num_samples(config_for(dataset)) == 40


def test_global_batch_is_split_over_processes(dataset, tokenizer):
    out, _ = batches(config_for(dataset), tokenizer, batch_size=None, shard=(1, 2), global_batch_size=4)
    assert out[0]["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="divisible"):
        batches(config_for(dataset), tokenizer, batch_size=None, shard=(0, 3), global_batch_size=4)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    good, images = numbered_records(6)
    human = lambda text: {"from": "human", "value": text}  # noqa: E731
    gpt = lambda text: {"from": "gpt", "value": text}  # noqa: E731
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [human("<image>\nq"), gpt("item90")]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [human("<image>\nq"), gpt("item91")]},
        {"id": "truncated", "image": "truncated.jpg", "conversations": [human("<image>\nq"), gpt("item92")]},
        {"id": "no_conversations", "image": "img0.png"},
        ["not", "an", "object"],
        {"id": "bad_image_field", "image": 7, "conversations": [human("<image>\nq"), gpt("item93")]},
        {"id": "empty", "conversations": []},
        {"id": "two_humans", "conversations": [human("a"), human("b")]},
        {"id": "count", "image": "img0.png", "conversations": [human("no image tag"), gpt("item94")]},
        {"id": "tag_no_image", "conversations": [human("<image>\nq"), gpt("item95")]},
        {"id": "long", "image": "img0.png", "conversations": [human("words " * 150 + "<image>"), gpt("item96")]},
        {"id": "too_many", "image": ["img0.png"] * 3, "conversations": [human("<image>" * 3), gpt("item97")]},
    ]
    jpeg = Image.new("RGB", (32, 32), (9, 9, 9))
    import io

    buffer = io.BytesIO()
    jpeg.save(buffer, format="JPEG")
    images["corrupt.png"] = b"\x89PNG\r\n\x1a\n garbage"
    images["truncated.jpg"] = buffer.getvalue()[:150]
    return write_dataset(str(directory), good + bad, images)


EXPECTED_SKIPS = {"missing_image": 1, "bad_image": 2, "malformed_sample": 3, "empty_conversation": 1,
                  "non_alternating": 1, "image_count_mismatch": 2, "too_long": 1, "too_many_images": 1}


def test_bad_samples_are_skipped_counted_and_logged(bad_dataset, tokenizer, caplog):
    out, iterator = batches(config_for(bad_dataset), tokenizer, batch_size=2)
    assert sorted(stream_of_ids(out, tokenizer)) == list(range(6))
    assert skip_counts(iterator) == EXPECTED_SKIPS
    assert iterator.get_state()["skip_counts"] == EXPECTED_SKIPS
    logged = caplog.text
    for sample_id in ("missing", "corrupt", "truncated", "two_humans", "long", "too_many"):
        assert f"'{sample_id}'" in logged


def test_bad_samples_raise_with_on_error_raise(bad_dataset, tokenizer):
    with pytest.raises(DataError, match="bad sample"):
        batches(config_for(bad_dataset, on_error="raise"), tokenizer)


def test_config_errors_name_the_field(dataset, tokenizer):
    for field, value in [("aspect", "anyres"), ("max_length", 500), ("on_error", "ignore"),
                         ("template", "nope")]:
        with pytest.raises(ValueError, match=field if field != "template" else "template"):
            batches(config_for(dataset, **{field: value}), tokenizer)


def test_orbax_checkpoint_of_the_iterator_resumes_exactly(dataset, tokenizer, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = config_for(dataset)
    full, _ = batches(config, tokenizer, seed=2)
    head, iterator = batches(config, tokenizer, limit=3, seed=2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    fresh = make_dataset(config, tokenizer, num_image_tokens=NUM_IMAGE_TOKENS,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_size=IMAGE_SIZE, batch_size=3, seed=2, shard_index=0, shard_count=1)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    rest = list(fresh)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(full[3:], rest):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
