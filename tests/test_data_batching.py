"""Packer: every sample exactly once, bounded waiting, high token efficiency on a mix665k-like mix."""

import numpy as np
import pytest

from llava_jax.data.batching import Item, Packer, assemble_batch


def mix665k_like(count, seed=0):
    """576 image tokens + 20-1500 text tokens (truncated at 2048), ~6% text-only up to 2048."""
    rng = np.random.default_rng(seed)
    items = []
    for key in range(count):
        if rng.random() < 0.06:
            items.append(Item(key, int(rng.integers(20, 2049)), 0, "text"))
        else:
            items.append(Item(key, min(2048, 576 + int(rng.integers(20, 1501))), 1, "image"))
    return items


def run(packer, items):
    """Batches, and for each key how many items of its modality arrived before it was emitted."""
    batches, emitted_at, arrivals = [], {}, {}
    for item in items:
        arrivals[item.modality] = arrivals.get(item.modality, 0) + 1
        item_arrival = arrivals[item.modality]
        item.arrival = item_arrival
        for rows in packer.add(item):
            batches.append(rows)
            for row in rows:
                for member in row:
                    emitted_at[member.key] = arrivals[member.modality] - member.arrival
    batches.extend(packer.flush())
    return batches, emitted_at


def efficiency(batches, packer):
    used = total = 0
    for rows in batches:
        fill = max(sum(m.length for m in row) for row in rows)
        total += packer.batch_size * packer.bucket_for(fill)
        used += sum(m.length for row in rows for m in row)
    return used / total


def test_packing_is_efficient_complete_fair_and_modality_pure():
    packer = Packer(16, tuple(range(1024, 2049, 128)), max_images_per_row=3)
    items = mix665k_like(3000)
    batches, emitted_at = run(packer, items)
    keys = sorted(m.key for rows in batches for row in rows for m in row)
    assert keys == list(range(3000))
    assert efficiency(batches, packer) >= 0.95
    for rows in batches:
        assert len(rows) <= 16 and len({m.modality for row in rows for m in row}) == 1
        for row in rows:
            assert sum(m.length for m in row) <= 2048 and sum(m.num_images for m in row) <= 3
    # No sample starves: emitted within a few pools' worth (~100 samples each) of later arrivals.
    assert max(emitted_at.values()) < 400


def test_pad_to_longest_is_much_worse_than_packing():
    items = mix665k_like(3000)
    lengths = np.array([item.length for item in items])
    padded = sum(16 * lengths[i : i + 16].max() for i in range(0, 2992, 16))
    assert lengths[:2992].sum() / padded < 0.75


def test_bucket_mode_one_sample_per_row_in_its_bucket():
    packer = Packer(4, (64, 128), max_images_per_row=1, packing=False)
    items = [Item(k, length, 0, "text") for k, length in enumerate([10, 100, 64, 65, 3, 128, 1, 2, 90])]
    batches, _ = run(packer, items)
    for rows in batches:
        assert all(len(row) == 1 for row in rows)
        assert len({packer.bucket_for(row[0].length) for row in rows}) == 1
    assert sorted(m.key for rows in batches for row in rows for m in row) == list(range(9))


def test_oversized_items_are_rejected():
    with pytest.raises(ValueError):
        Packer(2, (16,), 1).add(Item(0, 17, 0, "text"))
    with pytest.raises(ValueError):
        Packer(2, (16,), 1).add(Item(0, 4, 2, "image"))


def test_assemble_batch_layout():
    samples = [
        {"input_ids": np.array([1, 9, 9, 5], np.int32), "labels": np.array([-100, -100, -100, 5], np.int32),
         "pixel_values": np.ones((1, 2, 2, 3), np.float32)},
        {"input_ids": np.array([1, 6], np.int32), "labels": np.array([-100, 6], np.int32),
         "pixel_values": np.zeros((0, 2, 2, 3), np.float32)},
        {"input_ids": np.array([1, 9, 9, 7], np.int32), "labels": np.array([-100, -100, -100, 7], np.int32),
         "pixel_values": np.full((1, 2, 2, 3), 2, np.float32)},
    ]
    batch = assemble_batch([samples], batch_size=2, buckets=(8, 16), max_images_per_row=3, image_size=2, pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"][0], [1, 9, 9, 5, 1, 6, 1, 9, 9, 7] + [0] * 6)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 2, 2, 3, 3, 3, 3] + [0] * 6)
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 0, 1, 2, 3] + [0] * 6)
    np.testing.assert_array_equal(batch["labels"][0, :6], [-100, -100, -100, 5, -100, 6])
    assert batch["input_ids"].shape == (2, 16) and not batch["segment_ids"][1].any()
    np.testing.assert_array_equal(batch["image_mask"], [[True, True, False], [False, False, False]])
    assert batch["pixel_values"][0, 0].max() == 1 and batch["pixel_values"][0, 1].min() == 2
