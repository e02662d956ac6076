"""The grain input pipeline: LLaVA records -> fixed-shape training batches.

    source (JSON index or ArrayRecord)            random access, one raw record per index
      [shard_index::shard_count]                  each JAX process reads a disjoint shard
      .shuffle(seed).repeat(num_epochs)           reshuffled every epoch (grain folds the epoch in)
      .map_with_index(SampleProcessor)            decode + preprocess images (tiled models: cut
                                                  into tiles, data/anyres.py), tokenize; a bad
                                                  sample becomes a skip marker, never an exception
      .to_iter_dataset() [.mp_prefetch(workers)]  decoding in grain worker processes
      BatchIterator                               counts/logs skips, packs or buckets samples by
                                                  modality into the batch contract (batching.py)

`make_dataset(...)` returns the BatchIterator: a grain DatasetIterator, so `get_state()` /
`set_state()` and `grain.checkpoint.CheckpointSave/Restore` resume with exactly the next
batch. Its state holds the parent's state plus the stream indices of samples pooled for
packing; those are re-created from the random-access dataset on restore.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from llava_jax.data import anyres, batching
from llava_jax.data.conversation import get_template
from llava_jax.data.image import ASPECT_MODES, ImageDecodeError, decode_image, preprocess_image
from llava_jax.data.processor import ImageProcessor
from llava_jax.data.sources import ArrayRecordSource, JsonSource, record_image_names, resolve_image
from llava_jax.data.tokenize import (
    TokenizationError,
    count_images,
    normalize_conversation,
    span_encoder,
    tokenize_rounds,
)

SKIP_REASONS = (
    "malformed_sample",  # not a dict, missing/ill-typed id, image or conversations
    "empty_conversation",
    "non_alternating",
    "image_in_answer",
    "image_count_mismatch",  # <image> tags != images listed
    "too_many_images",  # more images than max_images_per_row (tiled: tiles > max_tiles_per_row)
    "missing_image",
    "bad_image",  # corrupt, truncated or not an image
    "tiny_image",  # tiled models: so thin that its unpadded feature grid has no row or column
    "unfaithful_tokenization",
    "too_long",  # truncation would cut an image or leave nothing to train
)
BUILTIN_DATA = ("", "demo", "demo_multiround", "easy_vqa")  # data.builtin: data/demo.py, easy_vqa.py


class DataError(RuntimeError):
    """A bad sample with on_error='raise'."""


def default_data_config(stage: int = 2) -> ml_collections.ConfigDict:
    """Data settings with defaults; stage 1 = LLaVA pretraining, stage 2 = instruction tuning."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    config = ml_collections.ConfigDict()
    config.json_paths = ()  # LLaVA JSON / JSONL files, read in this order
    config.array_record_paths = ""  # or ArrayRecord shards: dir, glob, prefix or list (wins)
    config.image_roots = ()  # folders searched in order for each record's "image"
    config.template = "plain" if stage == 1 else "vicuna_v1"  # conversation.TEMPLATES
    config.aspect = "square" if stage == 1 else "pad"  # "pad" (expand2square) | "square"
    config.max_length = 2048  # tokens after image expansion; longer samples are truncated
    # Allowed batch lengths L (one compiled shape each); max(buckets) >= max_length. Fine steps
    # let packed rows of similar fill share a short length: 96-97% tokens are real on mix665k.
    config.buckets = tuple(range(1024, 2049, 128))
    config.packing = True  # several samples per row (segment ids); else one per row
    config.max_images_per_row = 3  # I: image slots per row (fixed pixel_values shape)
    # Tiled (anyres) models: tile slots per row, shared by the row's images (fixed
    # pixel_values [B, tiles, 1, H, W, 3]); 0 = the tiles of one largest image (base + grid).
    config.max_tiles_per_row = 0
    config.pool_batches = 4  # packing look-ahead, in batches' worth of tokens
    config.group_by_modality = True  # all-image or all-text batches (as the original)
    config.shuffle = True
    config.num_epochs = 1  # None = repeat forever
    config.worker_count = 0  # grain worker processes for decoding (0 = in process)
    config.worker_buffer_size = 8  # samples buffered per worker
    config.read_threads = 2  # threads per process reading/decoding ahead
    config.read_buffer_size = 32  # samples read ahead per process
    config.on_error = "skip"  # "skip": count + log bad samples | "raise"
    config.exif_transpose = True  # apply EXIF orientation (the original did not)
    config.use_index_cache = True  # cache JSON byte-offset indexes under $LLAVA_JAX_CACHE
    config.builtin = ""  # "demo" | "demo_multiround" | "easy_vqa": built-in data, prepared on first use
    return config


def validate_data_config(config) -> None:
    """Fail fast, naming the field, on settings that cannot work."""

    def bad(field, message):
        raise ValueError(f"data.{field}: {message}")

    if not config.json_paths and not config.array_record_paths:
        bad("json_paths", "set json_paths (LLaVA JSON files) or array_record_paths")
    get_template(config.template)
    if config.aspect not in ASPECT_MODES:
        bad("aspect", f"must be one of {ASPECT_MODES}, got {config.aspect!r}")
    if not config.buckets or any(int(b) <= 0 for b in config.buckets):
        bad("buckets", f"needs positive lengths, got {config.buckets!r}")
    if config.max_length > max(config.buckets):
        bad("max_length", f"{config.max_length} exceeds the largest bucket {max(config.buckets)}")
    if config.max_images_per_row < 1:
        bad("max_images_per_row", "must be >= 1 (text-only batches keep the slots, masked)")
    if config.max_tiles_per_row < 0:
        bad("max_tiles_per_row", "must be >= 0 (0: the tiles one largest image needs)")
    if config.on_error not in ("skip", "raise"):
        bad("on_error", f"must be 'skip' or 'raise', got {config.on_error!r}")
    if config.num_epochs is not None and config.num_epochs < 1:
        bad("num_epochs", "must be >= 1 or None (forever)")
    if config.worker_count < 0:
        bad("worker_count", "must be >= 0")
    if config.builtin not in BUILTIN_DATA:
        bad("builtin", f"must be one of {BUILTIN_DATA}, got {config.builtin!r}")


def make_source(config):
    """The raw-record source the config names (ArrayRecord shards win over JSON files)."""
    if config.array_record_paths:
        return ArrayRecordSource(config.array_record_paths)
    paths = [config.json_paths] if isinstance(config.json_paths, str) else list(config.json_paths)
    return JsonSource(paths, use_index_cache=config.use_index_cache)


def num_samples(config) -> int:
    """Records in the dataset (before skips, all shards): for schedule lengths."""
    return len(make_source(config))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """A tiled (anyres) model's image handling in training.

    spec: the model's layout (data/anyres.py). image_processor: its processor's image half
    (data/processor.py; the checkpoint's preprocessor_config.json, else the default for the
    config), so training sees the pixels inference will. tiles_per_row: tile slots a packed
    row's images share.
    """

    spec: anyres.AnyresSpec
    image_processor: ImageProcessor
    tiles_per_row: int


def make_tiling(model_config, data_config, preprocessor: dict | None = None) -> Tiling:
    """The Tiling of an anyres LlavaConfig; `preprocessor`: a preprocessor_config.json dict."""
    spec = anyres.AnyresSpec.from_config(model_config)
    image_processor = ImageProcessor.for_model(model_config, preprocessor)
    tiles = data_config.max_tiles_per_row or spec.max_tiles
    if tiles < spec.max_tiles:
        logging.warning("data.max_tiles_per_row=%d < %d, the tiles of one image at the largest "
                        "pinpoint: such samples are skipped (too_many_images)", tiles,
                        spec.max_tiles)
    return Tiling(spec=spec, image_processor=image_processor, tiles_per_row=tiles)


class SampleProcessor:
    """(stream index, raw record) -> a training sample, or a skip marker naming the reason.

    Runs in grain workers; picklable. A sample is a dict: input_ids int32[n], labels int32[n],
    pixel_values float32[k, H, W, 3], num_images k, truncated, stream_index, id. With a
    `tiling` (tiled models): pixel_values float32[t, H, W, 3], all tiles of the k images in
    order, num_tiles t, and layouts (k anyres.ImageLayout); each image's placeholder count
    follows from its size.
    """

    def __init__(self, config, tokenizer, *, num_image_tokens, image_token_index, image_size,
                 tiling: Tiling | None = None):
        self._tiling = tiling
        self._template = get_template(config.template)
        self._tokenizer = tokenizer
        self._num_image_tokens = num_image_tokens
        self._image_token_index = image_token_index
        self._image_size = image_size
        self._aspect = config.aspect
        self._max_length = config.max_length
        self._max_images = config.max_images_per_row
        self._image_roots = list(config.image_roots)
        self._exif_transpose = config.exif_transpose

    def __call__(self, stream_index: int, record: dict) -> dict:
        sample_id = "?"
        try:
            if not isinstance(record, dict) or "_not_a_dict" in record:
                raise TokenizationError("malformed_sample", "record is not a JSON object")
            sample_id = str(record.get("id", f"record#{record.get('_record_index', '?')}"))
            return self._process(stream_index, record, sample_id)
        except TokenizationError as error:
            return _skip(stream_index, sample_id, error.reason, str(error))
        except FileNotFoundError as error:
            return _skip(stream_index, sample_id, "missing_image", str(error))
        except ImageDecodeError as error:
            return _skip(stream_index, sample_id, "bad_image", str(error))

    def _process(self, stream_index: int, record: dict, sample_id: str) -> dict:
        if "conversations" not in record:
            raise TokenizationError("malformed_sample", "missing 'conversations'")
        names = record_image_names(record)
        if not all(isinstance(name, str) for name in names):
            raise TokenizationError("malformed_sample", "'image' must be a string or list of strings")
        rounds = normalize_conversation(record["conversations"], self._template)
        tags = count_images(record["conversations"])
        # plain (stage 1) trains "<image>" + caption: exactly one image.
        if tags != len(names) or (self._template.style == "plain" and tags != 1):
            raise TokenizationError(
                "image_count_mismatch", f"{tags} <image> tags for {len(names)} images"
            )
        if len(names) > self._max_images:
            raise TokenizationError(
                "too_many_images", f"{len(names)} images > max_images_per_row {self._max_images}"
            )
        encoded = record.get("_image_bytes")

        def image(slot: int, name: str):
            data = encoded[slot] if encoded is not None else resolve_image(name, self._image_roots)
            return decode_image(data, exif_transpose=self._exif_transpose)

        if self._tiling is not None:
            return self._tiled(stream_index, sample_id, rounds,
                               [image(slot, name) for slot, name in enumerate(names)])
        input_ids, labels, truncated = tokenize_rounds(
            rounds, span_encoder(self._tokenizer), self._template, self._num_image_tokens,
            self._image_token_index, self._max_length,
        )
        pixels = np.zeros((len(names), self._image_size, self._image_size, 3), np.float32)
        for slot, name in enumerate(names):
            pixels[slot] = preprocess_image(image(slot, name), self._image_size, self._aspect)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixels,
            "num_images": len(names),
            "truncated": truncated,
            "stream_index": stream_index,
            "id": sample_id,
        }

    def _tiled(self, stream_index: int, sample_id: str, rounds, images) -> dict:
        """A tiled model's sample: layouts from the images' sizes, then tokens and tiles."""
        spec, tiles_per_row = self._tiling.spec, self._tiling.tiles_per_row
        layouts = anyres.row_layouts([(im.height, im.width) for im in images], spec)
        for im, layout in zip(images, layouts):
            if layout.tiled and min(layout.shape) < 1:
                raise TokenizationError(
                    "tiny_image", f"a {im.width}x{im.height} image leaves no feature row or "
                    "column after unpadding")
        num_tiles = sum(layout.num_tiles for layout in layouts)
        if num_tiles > tiles_per_row:
            raise TokenizationError(
                "too_many_images", f"{num_tiles} tiles > data.max_tiles_per_row {tiles_per_row}")
        input_ids, labels, truncated = tokenize_rounds(
            rounds, span_encoder(self._tokenizer), self._template,
            [layout.num_tokens(spec) for layout in layouts], self._image_token_index,
            self._max_length,
        )
        size = self._image_size
        pixels = np.zeros((0, size, size, 3), np.float32)
        if images:
            pixels = np.concatenate([self._tiling.image_processor.tiles(im, layout, spec)
                                     for im, layout in zip(images, layouts)])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixels,
            "num_images": len(images),
            "num_tiles": num_tiles,
            "layouts": layouts,
            "truncated": truncated,
            "stream_index": stream_index,
            "id": sample_id,
        }


def _skip(stream_index: int, sample_id: str, reason: str, message: str) -> dict:
    return {"skip_reason": reason, "id": sample_id, "message": message, "stream_index": stream_index}


class BatchIterator(grain.DatasetIterator):
    """Final stage: skip accounting and batching; a checkpointable grain DatasetIterator."""

    def __init__(self, parent, samples: grain.MapDataset, packer: batching.Packer, *,
                 image_size: int, pad_id: int, on_error: str, tiling: Tiling | None = None):
        super().__init__(parent)
        self._tiling = tiling
        self._samples = samples  # random access, to re-create pooled samples on restore
        self._packer = packer
        self._image_size = image_size
        self._pad_id = pad_id
        self._on_error = on_error
        self._held: dict[int, dict] = {}  # stream index -> pooled sample
        self._ready: list[list[list[int]]] = []  # batches decided but not returned
        self._exhausted = False
        self.skip_counts: dict[str, int] = {}
        self.num_truncated = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            if self._exhausted:
                raise StopIteration
            try:
                sample = next(self._parent)
            except StopIteration:
                self._exhausted = True
                self._queue(self._packer.flush())
                continue
            if "skip_reason" in sample:
                self._count_skip(sample)
                continue
            self.num_truncated += int(sample["truncated"])
            self._held[sample["stream_index"]] = sample
            self._queue(self._packer.add(self._item(sample)))
        rows = self._ready.pop(0)
        batch = batching.assemble_batch(
            [[self._held.pop(key) for key in row] for row in rows],
            batch_size=self._packer.batch_size, buckets=self._packer.buckets,
            max_images_per_row=self._packer.max_images_per_row,
            image_size=self._image_size, pad_id=self._pad_id,
            tiled=None if self._tiling is None else self._tiling.spec,
        )
        return batch

    def _queue(self, batches) -> None:
        self._ready.extend([[item.key for item in row] for row in rows] for rows in batches)

    @staticmethod
    def _item(sample: dict) -> batching.Item:
        # Tiled models: the row budget the packer fills is tile slots, not image slots.
        return batching.Item(
            key=int(sample["stream_index"]), length=len(sample["input_ids"]),
            num_images=int(sample.get("num_tiles", sample["num_images"])),
            modality="image" if sample["num_images"] else "text",
        )

    def _count_skip(self, marker: dict) -> None:
        reason = marker["skip_reason"]
        if self._on_error == "raise":
            raise DataError(f"bad sample {marker['id']!r}: {marker['message']}")
        self.skip_counts[reason] = self.skip_counts.get(reason, 0) + 1
        logging.warning("skipping sample %r: %s", marker["id"], marker["message"])

    def _refetch(self, stream_index: int) -> dict:
        sample = self._samples[stream_index]
        if "skip_reason" in sample:  # cannot happen unless the data changed on disk
            raise DataError(f"pooled sample {sample['id']!r} became unreadable: {sample['message']}")
        self._held[stream_index] = sample
        return sample

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "pools": self._packer.state(),
            "ready": self._ready,
            "exhausted": self._exhausted,
            "skip_counts": dict(self.skip_counts),
            "num_truncated": self.num_truncated,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held = {}
        self._packer.restore(state["pools"], lambda key: self._item(self._refetch(key)))
        self._ready = [[list(row) for row in rows] for rows in state["ready"]]
        for rows in self._ready:
            for row in rows:
                for key in row:
                    self._refetch(key)
        self._exhausted = state["exhausted"]
        self.skip_counts = dict(state["skip_counts"])
        self.num_truncated = state["num_truncated"]

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def skip_counts(iterator: BatchIterator) -> dict[str, int]:
    """Skipped samples per reason so far (restored with the iterator state)."""
    return dict(iterator.skip_counts)


def make_dataset(
    data_config,
    tokenizer,
    *,
    num_image_tokens: int,
    image_token_index: int,
    image_size: int,
    batch_size: int | None = None,
    global_batch_size: int | None = None,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pad_id: int | None = None,
    tiling: Tiling | None = None,
) -> BatchIterator:
    """Iterator of training batches (dicts of numpy arrays, see batching.py) for this process.

    Args:
      data_config: `default_data_config()` with paths filled in.
      tokenizer: transformers fast tokenizer.
      num_image_tokens, image_token_index, image_size: the model's image placeholder length and
        id, and CLIP's input size.
      batch_size / global_batch_size: rows per process, or rows over all processes (divided by
        shard_count); give exactly one.
      seed: shuffle seed (each epoch is reshuffled from it).
      shard_index, shard_count: this process's data shard; default jax.process_index() /
        jax.process_count().
      pad_id: id for empty positions; default the tokenizer's pad id, else its unk id (as the
        original sets pad = unk), else 0.
      tiling: a tiled (anyres) model's `make_tiling(...)`: images become tiles and
        placeholder counts follow each image's size (data.aspect does not apply); batches
        take batching.py's tiled form.
    """
    validate_data_config(data_config)
    if shard_index is None or shard_count is None:
        import jax  # only here: the data package stays importable (and fast) without JAX

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if (batch_size is None) == (global_batch_size is None):
        raise ValueError("give exactly one of batch_size (per process) and global_batch_size")
    if global_batch_size is not None:
        if global_batch_size % shard_count:
            raise ValueError(f"global_batch_size {global_batch_size} not divisible by {shard_count} processes")
        batch_size = global_batch_size // shard_count
    if pad_id is None:
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id) if i is not None), 0)

    source = make_source(data_config)
    if len(source) < shard_count:
        raise ValueError(f"{len(source)} records cannot feed {shard_count} shards")
    records = grain.MapDataset.source(source)[shard_index::shard_count]
    if data_config.shuffle:
        records = records.shuffle(seed=seed)
    records = records.repeat(data_config.num_epochs)
    samples = records.map_with_index(SampleProcessor(
        data_config, tokenizer, num_image_tokens=num_image_tokens,
        image_token_index=image_token_index, image_size=image_size, tiling=tiling,
    ))
    stream = samples.to_iter_dataset(grain.ReadOptions(
        num_threads=data_config.read_threads, prefetch_buffer_size=data_config.read_buffer_size,
    ))
    if data_config.worker_count > 0:
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_config.worker_count,
            per_worker_buffer_size=data_config.worker_buffer_size,
        ))
    packer = batching.Packer(
        batch_size, data_config.buckets,
        data_config.max_images_per_row if tiling is None else tiling.tiles_per_row,
        packing=data_config.packing, group_by_modality=data_config.group_by_modality,
        pool_batches=data_config.pool_batches,
    )
    return BatchIterator(iter(stream), samples, packer, image_size=image_size, pad_id=pad_id,
                         on_error=data_config.on_error, tiling=tiling)
