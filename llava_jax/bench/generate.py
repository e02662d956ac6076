"""Generation speed: llava_jax `generate` vs transformers `LlavaForConditionalGeneration.generate`.

`python -m llava_jax.bench generate [--batch-sizes=1,8] [--max-new-tokens=64] [--repeats=5]`

Both sides hold the same random weights (float32) of a small LLaVA (default: LLaMA 512 wide x
4 layers, 8 heads, vocab 32064; CLIP 256 wide x 4 layers at 112 px, 64 image tokens) and
decode greedily with a KV cache, the same prompt (one image + text) repeated over the batch,
with EOS disabled so every run produces exactly max_new_tokens tokens.

  prefill tokens/s = batch * prompt_len / t(max_new_tokens=1)
  decode  tokens/s = batch * (N - 1) / (t(max_new_tokens=N) - t(max_new_tokens=1))

Each repeat times both sides back to back, alternating which goes first; medians over
repeats; ratio = llava_jax / transformers (> 1: llava_jax faster). Compilation is excluded
(one warm-up call per shape). On a shared machine use --single-thread: torch's OpenMP pool
degrades badly when other processes hold the cores (measured here: one prefill 1.8 s with
2 threads vs 0.07 s with 1). The greedy tokens of both sides are compared once, as a check
that the two run the same computation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

from llava_jax.bench import common

# jax and our modules that import it are imported inside the functions, after main() has set
# XLA_FLAGS for --single-thread (main warns when jax is already imported).


def bench_config(args):
    from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig  # imports jax

    return LlavaConfig(
        vision=VisionConfig(**common.small_clip(args.vision_width, args.vision_layers,
                                                args.image_size)),
        text=TextConfig(vocab_size=32064, hidden_size=args.width,
                        intermediate_size=args.width * 11008 // 4096, num_layers=args.layers,
                        num_heads=args.heads, num_kv_heads=args.heads,
                        max_position_embeddings=2048),
        image_token_index=32000, pad_token_id=32001)


def torch_reference(model):
    """transformers LlavaForConditionalGeneration (float32, eval) with `model`'s weights."""
    from llava_jax.convert.reference import transformers_llava  # imports torch (optional)

    return transformers_llava(model)


def make_inputs(config, batch: int, text_tokens: int, seed: int = 0):
    """Prompt ids [batch, 1 + image tokens + text] (same row repeated) and pixels."""
    rng = np.random.default_rng(seed)
    row = np.concatenate([[1], [config.image_token_index] * config.num_image_tokens,
                          rng.integers(3, 31000, text_tokens)]).astype(np.int32)
    ids = np.repeat(row[None], batch, axis=0)
    size = config.vision.image_size
    pixels = rng.normal(size=(batch, 1, size, size, 3)).astype(np.float32)
    return ids, pixels


def _timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args) -> list[dict]:
    import torch  # optional dependency (the `torch` extra)

    from llava_jax.inference.generation import generate  # imports jax
    from llava_jax.models.llava import create_model

    if args.single_thread:
        torch.set_num_threads(1)
    config = bench_config(args)
    model = create_model(config, seed=0)
    reference = torch_reference(model)
    rows = []
    for batch in args.batch_sizes:
        ids, pixels = make_inputs(config, batch, args.text_tokens)
        torch_ids = torch.from_numpy(ids.astype(np.int64))
        torch_pixels = torch.from_numpy(pixels[:, 0].transpose(0, 3, 1, 2).copy())
        mask = torch.ones_like(torch_ids)

        def ours(steps):
            return generate(model, ids, pixels, max_new_tokens=steps, eos_token_id=-1)

        def theirs(steps):
            with torch.inference_mode():
                out = reference.generate(input_ids=torch_ids, pixel_values=torch_pixels,
                                         attention_mask=mask, max_new_tokens=steps,
                                         min_new_tokens=steps, do_sample=False,
                                         pad_token_id=config.pad_token_id)
            return out[:, ids.shape[1]:].numpy()

        # Warm-up: compiles our two programs; lets torch allocate its caches.
        for steps in (1, args.max_new_tokens):
            ours(steps), theirs(steps)
        same = np.array_equal(ours(args.max_new_tokens), theirs(args.max_new_tokens))
        times = {(side, steps): [] for side in ("jax", "torch") for steps in (1, args.max_new_tokens)}
        for repeat in range(args.repeats):
            order = common.alternate([("jax", ours), ("torch", theirs)], repeat)
            for steps in (1, args.max_new_tokens):
                for side, fn in order:
                    times[(side, steps)].append(_timed(lambda: fn(steps))[0])
        row = {"batch": batch, "prompt_len": int(ids.shape[1]),
               "max_new_tokens": args.max_new_tokens, "greedy_tokens_equal": bool(same)}
        for side in ("jax", "torch"):
            t1 = statistics.median(times[(side, 1)])
            tn = statistics.median(times[(side, args.max_new_tokens)])
            row[f"{side}_prefill_tok_s"] = batch * ids.shape[1] / t1
            row[f"{side}_decode_tok_s"] = batch * (args.max_new_tokens - 1) / max(tn - t1, 1e-9)
            row[f"{side}_total_s"] = tn
        row["prefill_ratio"] = row["jax_prefill_tok_s"] / row["torch_prefill_tok_s"]
        row["decode_ratio"] = row["jax_decode_tok_s"] / row["torch_decode_tok_s"]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    return (f"batch {row['batch']:>2} prompt {row['prompt_len']} new {row['max_new_tokens']}: "
            f"prefill tok/s jax {row['jax_prefill_tok_s']:.0f} torch "
            f"{row['torch_prefill_tok_s']:.0f} (x{row['prefill_ratio']:.2f}) | decode tok/s jax "
            f"{row['jax_decode_tok_s']:.1f} torch {row['torch_decode_tok_s']:.1f} "
            f"(x{row['decode_ratio']:.2f}) | same greedy tokens: {row['greedy_tokens_equal']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8",
                        type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens after the image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vision-width", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--single-thread", action="store_true",
                        help="one compute thread on both sides (torch.set_num_threads(1); XLA "
                             "without its Eigen thread pool): stable numbers on a shared machine")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be >= 2 (decode speed needs at least one step)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.single_thread:
        if "jax" in sys.modules:
            print("warning: jax is already imported; --single-thread cannot limit XLA's threads",
                  file=sys.stderr)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                                   "=false intra_op_parallelism_threads=1").strip()
    import jax  # only now: XLA_FLAGS is set above
    import torch  # optional dependency (the `torch` extra)

    if args.single_thread:
        torch.set_num_threads(1)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); float32, greedy, KV cache", flush=True)
    rows = run(args)
    common.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
