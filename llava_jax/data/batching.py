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
        if sum(member.length for member in pool) < self.pool_batches * self.batch_size * self.row_length:
            return []
        rows = self._first_fit_decreasing(pool)
        rows.sort(key=lambda row: (
            0 if max(member.waited for member in row) >= self.max_wait else 1,  # overdue first
            -sum(member.length for member in row),
            min(member.key for member in row),
        ))
        emitted = rows[: self.batch_size]
        taken = {member.key for row in emitted for member in row}
        remaining = [member for member in pool if member.key not in taken]
        for member in remaining:
            member.waited += 1
        self.pools[key] = remaining
        return [emitted]

    def flush(self) -> list[list[list[Item]]]:
        """All pooled items as batches (the last of each pool padded with empty rows)."""
        batches = []
        for key in sorted(self.pools):
            pool = self.pools[key]
            rows = self._first_fit_decreasing(pool) if self.packing else [[m] for m in pool]
            for start in range(0, len(rows), self.batch_size):
                batches.append(rows[start : start + self.batch_size])
        self.pools = {}
        return batches

    def _first_fit_decreasing(self, pool: list[Item]) -> list[list[Item]]:
        rows: list[list[Item]] = []
        room: list[tuple[int, int]] = []  # (tokens left, image slots left) per row
        for item in sorted(pool, key=lambda member: (-member.length, member.key)):
            for index, (tokens_left, images_left) in enumerate(room):
                if item.length <= tokens_left and item.num_images <= images_left:
                    rows[index].append(item)
                    room[index] = (tokens_left - item.length, images_left - item.num_images)
                    break
            else:
                rows.append([item])
                room.append((self.row_length - item.length, self.max_images_per_row - item.num_images))
        # Inside a row keep arrival order (stable; image slots follow it).
        return [sorted(row, key=lambda member: member.key) for row in rows]

    # ---- checkpointing ----------------------------------------------------------------------

    def state(self) -> dict[str, list[list[int]]]:
        return {key: [[m.key, m.waited] for m in pool] for key, pool in self.pools.items()}

    def restore(self, state: dict, make_item: Callable[[int], Item]) -> None:
        self.pools = {}
        for key, members in state.items():
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
) -> dict[str, np.ndarray]:
    """Pack rows of samples (dicts with input_ids, labels, pixel_values[k, H, W, 3]) into the
    contract's fixed-shape arrays (see module docstring). Missing rows are padding."""
    fullest = max((sum(len(s["input_ids"]) for s in row) for row in rows), default=1)
    ordered = sorted(buckets)
    length = ordered[min(bisect.bisect_left(ordered, fullest), len(ordered) - 1)]
    shape = (batch_size, length)
    batch: dict[str, Any] = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "labels": np.full(shape, IGNORE_INDEX, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "pixel_values": np.zeros(
            (batch_size, max_images_per_row, image_size, image_size, 3), np.float32
        ),
        "image_mask": np.zeros((batch_size, max_images_per_row), bool),
    }
    for row_index, row in enumerate(rows):
        cursor, slot = 0, 0
        for segment, sample in enumerate(row, start=1):
            n = len(sample["input_ids"])
            batch["input_ids"][row_index, cursor : cursor + n] = sample["input_ids"]
            batch["labels"][row_index, cursor : cursor + n] = sample["labels"]
            batch["segment_ids"][row_index, cursor : cursor + n] = segment
            batch["positions"][row_index, cursor : cursor + n] = np.arange(n, dtype=np.int32)
            for pixels in sample["pixel_values"]:
                batch["pixel_values"][row_index, slot] = pixels
                batch["image_mask"][row_index, slot] = True
                slot += 1
            cursor += n
    return batch
