"""Convert LLaVA JSON + image folders to ArrayRecord shards (for object stores / TPU VMs).

    python -m llava_jax.data.to_array_record --json=llava_v1_5_mix665k.json \\
        --image_root=./playground/data --output=/data/mix665k --num_shards=64

writes /data/mix665k-00000-of-00064.array_record ... Each entry holds the record's JSON and
its images as the original encoded bytes (no re-encoding, so decoding is bit-identical to the
file path), see sources.encode_array_record. Records keep their JSON order, split into
contiguous shards. Records whose image file is missing are left out, counted and logged; all
other checks happen when the pipeline reads the shards (set data.array_record_paths to
--output), exactly as for JSON input.

Needs the `array_record` package (pip install 'llava_jax[tfds]').
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags, logging
from tqdm import tqdm

from llava_jax.data.sources import JsonSource, encode_array_record, record_image_names, resolve_image


def shard_path(output: str, shard: int, num_shards: int) -> str:
    return f"{output}-{shard:05d}-of-{num_shards:05d}.array_record"


def convert(
    json_paths: Sequence[str],
    image_roots: Sequence[str],
    output: str,
    num_shards: int = 1,
    progress: bool = True,
) -> dict:
    """Write the shards; return {"paths": [...], "written": n, "missing_image": n}."""
    try:  # optional dependency (the `tfds` extra)
        from array_record.python.array_record_module import ArrayRecordWriter
    except ImportError as error:
        raise ImportError(
            "to_array_record needs the `array_record` package: pip install 'llava_jax[tfds]'"
        ) from error

    source = JsonSource(list(json_paths), use_index_cache=False)
    total = len(source)
    num_shards = max(1, min(num_shards, total))
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    paths = [shard_path(output, shard, num_shards) for shard in range(num_shards)]
    counts = {"written": 0, "missing_image": 0}
    bar = tqdm(total=total, unit="rec", disable=not progress, desc="to_array_record")
    for shard, path in enumerate(paths):
        # group_size:1 keeps every record individually addressable (random access).
        writer = ArrayRecordWriter(path, "group_size:1")
        try:
            for record_index in range(shard * total // num_shards, (shard + 1) * total // num_shards):
                record = source[record_index]
                try:
                    images = []
                    for name in record_image_names(record):
                        with open(resolve_image(str(name), image_roots), "rb") as handle:
                            images.append(handle.read())
                except FileNotFoundError as error:
                    counts["missing_image"] += 1
                    logging.warning("leaving out record %r: %s", record.get("id"), error)
                else:
                    writer.write(encode_array_record(record, images))
                    counts["written"] += 1
                bar.update(1)
        finally:
            writer.close()
    bar.close()
    return {"paths": paths, **counts}


_JSON = flags.DEFINE_multi_string("json", None, "LLaVA JSON/JSONL file(s).")
_IMAGE_ROOT = flags.DEFINE_multi_string("image_root", [], "Image folder(s), searched in order.")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: <output>-NNNNN-of-MMMMM.array_record")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of shards.")


def main(argv):
    del argv
    if not _JSON.value or not _OUTPUT.value:
        raise app.UsageError("--json and --output are required")
    result = convert(_JSON.value, _IMAGE_ROOT.value, _OUTPUT.value, _NUM_SHARDS.value)
    print(f"wrote {result['written']} records to {len(result['paths'])} shard(s) "
          f"({result['missing_image']} left out: missing image)")


if __name__ == "__main__":
    app.run(main)
