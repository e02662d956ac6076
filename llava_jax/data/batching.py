"""Fixed-shape batches from tokenized samples: length buckets or packing, grouped by modality.

The model/trainer contract (per process; B = batch rows, L = a length from `buckets`,
I = `max_images_per_row`, H = W = image size):

    input_ids    int32[B, L]        pad id where empty
    labels       int32[B, L]        -100 where not trained; aligned with input_ids (not shifted)
    segment_ids  int32[B, L]        1..k for the k samples packed in a row, 0 = padding
    positions    int32[B, L]        0.. restarting in every segment
    pixel_values float32[B, I, H, W, 3]
    image_mask   bool[B, I]         real image slots; the image placeholder runs of a row appear
                                    in input_ids in the order of its real slots

Tiled (anyres) models: a row's images share T = `max_images_per_row` *tile* slots (the packer
counts tiles), each tile an image slot of one tile for the model, and the placeholder -> feature
map replaces the slot order:

    pixel_values          float32[B, T, 1, H, W, 3]   the row's tiles, image by image
    image_mask            bool[B, T]                  tile slots in use
    image_feature_index   int32[B, L, 4]              data/anyres.py's map, placeholder k of a
    image_feature_weight  float32[B, L, 4]            row (k < L: placeholders are tokens)

Every segment starts with an untrained token (BOS or an image/system token), so a trainer that
shifts labels never trains one sample's last token to predict the next sample's first.

Two modes:
  * packing: samples of one modality are pooled until the pool holds `pool_batches` batches'
    worth of tokens; the pool is packed first-fit-decreasing into rows of max(buckets) tokens
    and at most I images, the B fullest rows are emitted (rows holding a sample that has waited
    `max_wait` rounds go first, so no sample starves) and the rest stay pooled.
  * buckets (packing off): one sample per row, batched with samples of the same modality and
    the same bucket (the smallest bucket that holds it).
The batch length is the smallest bucket that holds its fullest row.

The packer only sees opaque keys + sizes, so its state is a JSON-able structure of sample keys
(stream indices): the pipeline re-creates pending samples from the random-access dataset on
restore.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from llava_jax.data import anyres

IGNORE_INDEX = -100


@dataclasses.dataclass
class Item:
    """A sample as the packer sees it."""

    key: int  # stream index: identifies the sample for checkpointing
    length: int  # tokens
    num_images: int
    modality: str  # "image" | "text"
    waited: int = 0  # packing rounds spent in the pool


class Packer:
    """Deterministic assignment of items to rows and batches (see module docstring)."""

    def __init__(
        self,
        batch_size: int,
        buckets: Sequence[int],
        max_images_per_row: int,
        packing: bool = True,
        group_by_modality: bool = True,
        pool_batches: int = 4,
        max_wait: int = 4,
    ):
        self.batch_size = batch_size
        self.buckets = sorted(buckets)
        self.row_length = self.buckets[-1]
        self.max_images_per_row = max_images_per_row
        self.packing = packing
        self.group_by_modality = group_by_modality
        self.pool_batches = pool_batches
        self.max_wait = max_wait
        self.pools: dict[str, list[Item]] = {}
        self._next_attempt: dict[str, int] = {}  # pool tokens at which to try packing again

    def bucket_for(self, length: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, length)]

    def _pool_key(self, item: Item) -> str:
        modality = item.modality if self.group_by_modality else "any"
        if self.packing:
            return modality
        return f"{modality}/{self.bucket_for(item.length)}"

    def add(self, item: Item) -> list[list[list[Item]]]:
        """Pool `item`; return the batches (lists of rows of items) that became ready."""
        if item.length > self.row_length or item.num_images > self.max_images_per_row:
            raise ValueError(f"item {item.key} does not fit a row: {item}")
        key = self._pool_key(item)
        pool = self.pools.setdefault(key, [])
        pool.append(item)
        if not self.packing:
            if len(pool) < self.batch_size:
                return []
            del self.pools[key]
            return [[[member] for member in pool]]
        tokens = sum(member.length for member in pool)
        if tokens < self._next_attempt.get(key, self.pool_batches * self.batch_size * self.row_length):
            return []
        rows = self._first_fit_decreasing(pool)
        emitted = self._choose_rows(rows)
        if emitted is None:
            # No bucket has a full batch of rows yet: try again after a batch's worth more tokens.
            self._next_attempt[key] = tokens + self.batch_size * self.row_length
            return []
        self._next_attempt.pop(key, None)
        taken = {member.key for row in emitted for member in row}
        remaining = [member for member in pool if member.key not in taken]
        for member in remaining:
            member.waited += 1
        self.pools[key] = remaining
        return [emitted]

    def _choose_rows(self, rows: list[list[Item]]) -> list[list[Item]] | None:
        """B rows to emit: rows holding an overdue sample first; otherwise B rows whose fill
        needs the same bucket (the largest such bucket), so the batch length wastes little."""
        fill = lambda row: sum(member.length for member in row)  # noqa: E731
        first_key = lambda row: min(member.key for member in row)  # noqa: E731
        overdue = [row for row in rows if max(member.waited for member in row) >= self.max_wait]
        if overdue:
            # The oldest overdue row goes out now, with the fullest rows that need no longer a
            # bucket (widening the bucket only when there are not enough of them).
            oldest = min(overdue, key=first_key)
            for bucket in self.buckets[self.buckets.index(self.bucket_for(fill(oldest))):]:
                fitting = [row for row in rows if fill(row) <= bucket and row is not oldest]
                if len(fitting) >= self.batch_size - 1 or bucket == self.row_length:
                    fitting.sort(key=lambda row: (-fill(row), first_key(row)))
                    return [oldest] + fitting[: self.batch_size - 1]
        by_bucket: dict[int, list[list[Item]]] = {}
        for row in rows:
            by_bucket.setdefault(self.bucket_for(fill(row)), []).append(row)
        full = [bucket for bucket, group in by_bucket.items() if len(group) >= self.batch_size]
        if not full:
            return None
        group = by_bucket[max(full)]
        group.sort(key=lambda row: (-fill(row), first_key(row)))
        return group[: self.batch_size]

    def flush(self) -> list[list[list[Item]]]:
        """All pooled items as batches (the last of each pool padded with empty rows)."""
        batches = []
        for key in sorted(self.pools):
            pool = self.pools[key]
            rows = self._first_fit_decreasing(pool) if self.packing else [[m] for m in pool]
            # Similar fills side by side, so each batch takes a small bucket.
            rows.sort(key=lambda row: (-sum(m.length for m in row), min(m.key for m in row)))
            for start in range(0, len(rows), self.batch_size):
                batches.append(rows[start : start + self.batch_size])
        self.pools = {}
        self._next_attempt = {}
        return batches

    def _first_fit_decreasing(self, pool: list[Item]) -> list[list[Item]]:
        rows: list[list[Item]] = []
        tokens_left = np.empty(len(pool), np.int64)  # at most one row per item
        images_left = np.empty(len(pool), np.int64)
        for item in sorted(pool, key=lambda member: (-member.length, member.key)):
            fits = (tokens_left[: len(rows)] >= item.length) & (images_left[: len(rows)] >= item.num_images)
            index = int(fits.argmax()) if fits.any() else len(rows)
            if index == len(rows):
                rows.append([])
                tokens_left[index], images_left[index] = self.row_length, self.max_images_per_row
            rows[index].append(item)
            tokens_left[index] -= item.length
            images_left[index] -= item.num_images
        # Inside a row keep arrival order (stable; image slots follow it).
        return [sorted(row, key=lambda member: member.key) for row in rows]

    # ---- checkpointing ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "pools": {key: [[m.key, m.waited] for m in pool] for key, pool in self.pools.items()},
            "next_attempt": dict(self._next_attempt),
        }

    def restore(self, state: dict, make_item: Callable[[int], Item]) -> None:
        self.pools = {}
        self._next_attempt = dict(state["next_attempt"])
        for key, members in state["pools"].items():
            pool = []
            for sample_key, waited in members:
                item = make_item(sample_key)
                item.waited = waited
                pool.append(item)
            self.pools[key] = pool


def assemble_batch(
    rows: Sequence[Sequence[dict]],
    *,
    batch_size: int,
    buckets: Sequence[int],
    max_images_per_row: int,
    image_size: int,
    pad_id: int,
    tiled: anyres.AnyresSpec | None = None,
) -> dict[str, np.ndarray]:
    """Pack rows of samples (dicts with input_ids, labels, pixel_values[k, H, W, 3]) into the
    contract's fixed-shape arrays (see module docstring). Missing rows are padding.
    tiled: a tiled model's spec; samples then hold their tiles as pixel_values[t, H, W, 3]
    and their images' `layouts`, and max_images_per_row counts tile slots."""
    fullest = max((sum(len(s["input_ids"]) for s in row) for row in rows), default=1)
    ordered = sorted(buckets)
    length = ordered[min(bisect.bisect_left(ordered, fullest), len(ordered) - 1)]
    shape = (batch_size, length)
    slot_shape = (1, image_size, image_size, 3) if tiled else (image_size, image_size, 3)
    batch: dict[str, Any] = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "labels": np.full(shape, IGNORE_INDEX, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "pixel_values": np.zeros((batch_size, max_images_per_row, *slot_shape), np.float32),
        "image_mask": np.zeros((batch_size, max_images_per_row), bool),
    }
    if tiled:
        batch["image_feature_index"] = np.zeros((*shape, 4), np.int32)
        batch["image_feature_weight"] = np.zeros((*shape, 4), np.float32)
        newline = max_images_per_row * tiled.tokens_per_tile  # the model's table: tiles, newline
    for row_index, row in enumerate(rows):
        cursor, slot, placeholder = 0, 0, 0
        for segment, sample in enumerate(row, start=1):
            n = len(sample["input_ids"])
            batch["input_ids"][row_index, cursor : cursor + n] = sample["input_ids"]
            batch["labels"][row_index, cursor : cursor + n] = sample["labels"]
            batch["segment_ids"][row_index, cursor : cursor + n] = segment
            batch["positions"][row_index, cursor : cursor + n] = np.arange(n, dtype=np.int32)
            if tiled:
                slot, placeholder = _place_tiles(batch, row_index, slot, placeholder, sample,
                                                 tiled, newline)
            else:
                for pixels in sample["pixel_values"]:
                    batch["pixel_values"][row_index, slot] = pixels
                    batch["image_mask"][row_index, slot] = True
                    slot += 1
            cursor += n
    return batch


def _place_tiles(batch: dict, row: int, slot: int, placeholder: int, sample: dict,
                 spec: anyres.AnyresSpec, newline: int) -> tuple[int, int]:
    """Writes a sample's tiles from tile slot `slot` on and maps its placeholders (numbered
    from `placeholder`, after the row's earlier samples' ones) to them; returns the next free
    slot and placeholder."""
    tiles = len(sample["pixel_values"])
    batch["pixel_values"][row, slot:slot + tiles, 0] = sample["pixel_values"]
    batch["image_mask"][row, slot:slot + tiles] = True
    for layout in sample["layouts"]:
        index, weight = anyres.image_sources(layout, spec, slot * spec.tokens_per_tile, newline)
        batch["image_feature_index"][row, placeholder:placeholder + len(index)] = index
        batch["image_feature_weight"][row, placeholder:placeholder + len(index)] = weight
        placeholder += len(index)
        slot += layout.num_tiles
    return slot, placeholder
