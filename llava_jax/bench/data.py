"""Data benchmarks (`python -m llava_jax.bench data`, or `python -m llava_jax.bench_data`).

Three measurements, each a ratio or a size taken in one run (this machine is noisy: the two
sides of a comparison alternate and medians are reported):

1. Stage-2 preprocessing, samples/s in one process: our SampleProcessor (JPEG decode, pad to
   square, CLIP preprocess, span-by-span tokenization with labels) against the transformers
   path the original used (PIL decode + expand2square + CLIPImageProcessor + tokenizing the
   prompt chunks around "<image>"). Same photos, same conversations. Also our whole pipeline
   (grain + batching) end to end.
2. Token efficiency (real tokens / all tokens) on a mix665k-like length mix (576 image tokens
   + 20-1500 text tokens, ~6% text-only up to 2048): our packing with length buckets, our
   bucketing without packing, and the original's pad-to-longest-in-batch.
3. Opening a 665K-record LLaVA JSON: index time cold and cached, and the index's memory
   (absolute numbers: no reference side).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from llava_jax.data import default_data_config, expand_to_square, make_dataset
from llava_jax.data.batching import Item, Packer
from llava_jax.data.conversation import get_template
from llava_jax.data.pipeline import SampleProcessor
from llava_jax.data.tokenize import normalize_conversation

LLAMA_TOKENIZER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "assets",
    "llama2-tokenizer", "tokenizer.json",
)


def _tokenizer(path: str | None):
    # Here, not at the top: transformers costs ~1 s to import, and --help needs none of it.
    from transformers import PreTrainedTokenizerFast

    if path and os.path.isfile(path):
        return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>"), "llama-2 (" + path + ")"
    from llava_jax.data.testing import build_test_tokenizer  # imports transformers

    return build_test_tokenizer(), "test BPE tokenizer (Llama tokenizer not found)"


def _photo_records(directory: str, count: int, seed: int = 0):
    """COCO-like JPEGs (real photographs resized to 640x427-ish) with 3-round conversations."""
    from skimage import data  # optional dependency (the `test` extra): the sample photographs

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    words = "the a man woman dog cat red blue table street car sign holding near left right of in on".split()
    records = []
    for index in range(count):
        width, height = (640, int(rng.integers(360, 480))) if index % 2 else (int(rng.integers(360, 480)), 640)
        photo = photos[index % 4].resize((width, height))
        name = f"{index:05d}.jpg"
        photo.save(os.path.join(directory, "images", name), quality=90)
        conversations = []
        for turn in range(3):
            question = " ".join(rng.choice(words, int(rng.integers(8, 20)))) + "?"
            answer = " ".join(rng.choice(words, int(rng.integers(10, 60)))) + "."
            conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        records.append({"id": str(index), "image": name, "conversations": conversations})
    path = os.path.join(directory, "data.json")
    with open(path, "w") as handle:
        json.dump(records, handle)
    return path, os.path.join(directory, "images"), records


def bench_preprocessing(tokenizer, rounds: int, count: int, image_size: int = 336) -> dict:
    # transformers (the reference side, ~1 s to import) only when this runs.
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    processor = Processor(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size})
    template = get_template("vicuna_v1")
    with tempfile.TemporaryDirectory() as directory:
        json_path, image_root, records = _photo_records(directory, count)
        config = default_data_config(2)
        config.json_paths, config.image_roots = (json_path,), (image_root,)
        config.use_index_cache = False
        ours = SampleProcessor(config, tokenizer, num_image_tokens=576, image_token_index=32000,
                               image_size=image_size)
        raw = [dict(record, _image_bytes=None) for record in records]

        def run_ours():
            for index, record in enumerate(raw):
                sample = ours(index, record)
                assert "skip_reason" not in sample, sample

        def run_transformers():
            fill = tuple(int(x * 255) for x in processor.image_mean)
            for record in records:
                image = Image.open(os.path.join(image_root, record["image"])).convert("RGB")
                processor(expand_to_square(image, fill), return_tensors="np")
                prompt = template.render(normalize_conversation(record["conversations"], template))
                chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
                ids = chunks[0] + [t for chunk in chunks[1:] for t in [-200] + chunk[1:]]
                assert ids

        timings = {"ours": [], "transformers": []}
        run_ours(), run_transformers()  # warm caches and lazy imports
        for _ in range(rounds):
            for name, function in (("ours", run_ours), ("transformers", run_transformers)):
                start = time.perf_counter()
                function()
                timings[name].append(count / (time.perf_counter() - start))

        def run_pipeline():
            iterator = make_dataset(config, tokenizer, num_image_tokens=576, image_token_index=32000,
                                    image_size=image_size, batch_size=2, seed=0, shard_index=0,
                                    shard_count=1)
            start = time.perf_counter()
            samples = sum(int(batch["segment_ids"].max(axis=1).sum()) for batch in iterator)
            return samples / (time.perf_counter() - start)

        pipeline = statistics.median(run_pipeline() for _ in range(max(1, rounds // 2)))
    result = {name: statistics.median(values) for name, values in timings.items()}
    result["pipeline_end_to_end"] = pipeline
    result["ratio"] = result["ours"] / result["transformers"]
    return result


def bench_token_efficiency(count: int, batch_size: int = 16) -> dict:
    rng = np.random.default_rng(0)
    items = []
    for key in range(count):
        if rng.random() < 0.06:
            items.append(Item(key, int(rng.integers(20, 2049)), 0, "text"))
        else:  # truncated at model_max_length 2048, as the original does
            items.append(Item(key, min(2048, 576 + int(rng.integers(20, 1501))), 1, "image"))
    config = default_data_config(2)

    def efficiency(packing: bool) -> float:
        packer = Packer(batch_size, config.buckets, config.max_images_per_row, packing=packing,
                        pool_batches=config.pool_batches)
        batches = [rows for item in items for rows in packer.add(Item(**vars(item)))] + packer.flush()
        used = sum(m.length for rows in batches for row in rows for m in row)
        padded = sum(batch_size * packer.bucket_for(max(sum(m.length for m in row) for row in rows))
                     for rows in batches)
        return used / padded

    lengths = np.array([item.length for item in items])[rng.permutation(count)]
    full = count // batch_size * batch_size
    pad_to_longest = lengths[:full].sum() / sum(
        batch_size * lengths[start : start + batch_size].max() for start in range(0, full, batch_size))
    return {"packing": efficiency(True), "buckets_no_packing": efficiency(False),
            "pad_to_longest": float(pad_to_longest), "buckets": list(config.buckets),
            "batch_size": batch_size, "max_images_per_row": config.max_images_per_row}


_INDEX_CHILD = """
import json, sys, time
from llava_jax.data.sources import JsonIndex

def status_mb(field):  # VmHWM (peak) and VmRSS of this process, from /proc
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

base = status_mb("VmRSS")
start = time.perf_counter()
index = JsonIndex.load(sys.argv[1], use_cache=sys.argv[2] == "1")
seconds = time.perf_counter() - start
arrays = (index.offsets, index.lengths, index.num_images, index.text_chars)
print(json.dumps({"seconds": seconds, "records": len(index),
                  "peak_rss_growth_mb": status_mb("VmHWM") - base,
                  "index_mb": sum(a.nbytes for a in arrays) / 2**20}))
"""


def bench_index(records: int) -> dict:
    """Write a mix665k-sized JSON (records like the real file, ~1 KB each) and open it."""
    rng = np.random.default_rng(0)
    words = "the a man woman dog cat red blue table street car sign holding near left right".split()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "big.json")
        start = time.perf_counter()
        with open(path, "w") as handle:
            handle.write("[")
            for index in range(records):
                record = {"id": f"{index:09d}", "image": f"coco/train2017/{index:012d}.jpg",
                          "conversations": []}
                if index % 16 == 0:
                    del record["image"]
                for turn in range(int(rng.integers(1, 4))):
                    text = " ".join(words[i] for i in rng.integers(0, len(words), 60))
                    record["conversations"] += [{"from": "human", "value": text[:80] + "?"},
                                                {"from": "gpt", "value": text}]
                handle.write(("," if index else "") + json.dumps(record))
            handle.write("]")
        written = time.perf_counter() - start
        size_mb = os.path.getsize(path) / 2**20
        env = dict(os.environ, LLAVA_JAX_CACHE=os.path.join(directory, "cache"))
        run = lambda cache: json.loads(subprocess.run(  # noqa: E731
            [sys.executable, "-c", _INDEX_CHILD, path, cache], env=env, check=True,
            capture_output=True, text=True).stdout)
        cold = run("1")  # builds and writes the cache
        warm = run("1")
    return {"records": records, "file_mb": size_mb, "write_seconds": written, "cold": cold, "cached": warm}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=LLAMA_TOKENIZER, help="tokenizer.json (Llama-2)")
    parser.add_argument("--samples", type=int, default=48, help="photos per preprocessing round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side")
    parser.add_argument("--efficiency_samples", type=int, default=20000)
    parser.add_argument("--index_records", type=int, default=665_000, help="0 skips the index test")
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()
    tokenizer, tokenizer_name = _tokenizer(args.tokenizer)
    results = {"tokenizer": tokenizer_name}

    results["token_efficiency"] = efficiency = bench_token_efficiency(args.efficiency_samples)
    print(f"token efficiency on a mix665k-like mix ({args.efficiency_samples} samples, B="
          f"{efficiency['batch_size']}, buckets {efficiency['buckets'][0]}..{efficiency['buckets'][-1]}"
          f", I={efficiency['max_images_per_row']}):")
    for name in ("packing", "buckets_no_packing", "pad_to_longest"):
        print(f"  {name:20s} {efficiency[name] * 100:6.2f}% real tokens")

    results["preprocessing"] = pre = bench_preprocessing(tokenizer, args.rounds, args.samples)
    print(f"stage-2 preprocessing, 1 process, 336 px pad + vicuna_v1 ({tokenizer_name}):")
    print(f"  ours (SampleProcessor)        {pre['ours']:7.1f} samples/s (median of {args.rounds})")
    print(f"  transformers CLIPImageProcessor path {pre['transformers']:7.1f} samples/s")
    print(f"  ratio ours/transformers       {pre['ratio']:7.2f}x")
    print(f"  our pipeline end to end (grain, batching, 0 workers) {pre['pipeline_end_to_end']:7.1f} samples/s")

    if args.index_records:
        results["index"] = index = bench_index(args.index_records)
        print(f"opening a {index['records']}-record LLaVA JSON ({index['file_mb']:.0f} MB):")
        print(f"  cold index   {index['cold']['seconds']:6.2f} s, peak RSS growth "
              f"{index['cold']['peak_rss_growth_mb']:.0f} MB, index {index['cold']['index_mb']:.1f} MB")
        print(f"  cached index {index['cached']['seconds']:6.2f} s")
    return results


if __name__ == "__main__":
    main()
