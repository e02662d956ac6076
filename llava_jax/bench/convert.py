"""Conversion peak memory: `python -m llava_jax.bench convert`.

Writes a random transformers-layout LLaVA checkpoint of about 2 GB (float32, several
safetensors shards), then runs `convert hf-to-jax` and `convert jax-to-hf` on it as
subprocesses and reports each one's peak resident memory against the checkpoint size.
There is no PyTorch side: the references are the checkpoint's own size and the peak of
`convert --help` (what importing python + jax + orbax alone costs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llava_jax.bench import common
from llava_jax.convert import hf_config, mapping
from llava_jax.convert.tensors import ShardedSafetensorsWriter
from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models.llava import abstract_model


def bench_config(num_layers: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(**common.small_clip()),
        text=TextConfig(vocab_size=32064, hidden_size=1536, intermediate_size=4096,
                        num_layers=num_layers, num_heads=12, num_kv_heads=12))


def write_random_checkpoint(directory: Path, config: LlavaConfig, shard_bytes: int) -> int:
    """Random float32 tensors under transformers' names; returns total bytes."""
    directory.mkdir(parents=True)
    specs = mapping.param_specs(config, mapping.flat_param_shapes(abstract_model(config)))
    writer = ShardedSafetensorsWriter(directory, shard_bytes)
    writer.plan([(name, spec.to_torch(np.empty(spec.shape[1:] if spec.stacked else spec.shape,
                                                np.int8)).shape, np.float32)
                 for spec in specs for name in spec.torch_names])
    rng = np.random.default_rng(0)
    for spec in specs:
        per_layer = spec.shape[1:] if spec.stacked else spec.shape
        for name in spec.torch_names:
            tensor = rng.standard_normal(per_layer, dtype=np.float32) * 0.02
            writer.add(name, spec.to_torch(tensor))
    writer.close()
    (directory / "config.json").write_text(json.dumps(hf_config.to_hf_llava(config)))
    return writer.total_bytes


def run_measured(args: list[str]) -> tuple[float, float]:
    """Runs `python -m llava_jax.convert ARGS`; returns (seconds, peak RSS in bytes)."""
    start = time.perf_counter()
    wrapper = ("import resource, runpy, sys; sys.argv = ['convert'] + sys.argv[1:];"
               "code = 0\n"
               "try: runpy.run_module('llava_jax.convert', run_name='__main__')\n"
               "except SystemExit as e: code = e.code or 0\n"
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"convert {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    peak_kb = int(result.stderr.split("PEAK_RSS_KB")[-1].split()[0])
    return time.perf_counter() - start, peak_kb * 1024.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench convert", description=__doc__)
    parser.add_argument("--num-layers", type=int, default=32, help="decoder layers (size knob)")
    parser.add_argument("--shard-mb", type=int, default=400, help="input shard size in MB")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="llava_jax_bench_convert_"))
    try:
        config = bench_config(args.num_layers)
        total = write_random_checkpoint(root / "hf", config, args.shard_mb << 20)
        shards = len(list((root / "hf").glob("*.safetensors")))
        largest = max(int(np.prod(s.shape)) * 4 for s in mapping.param_specs(
            config, mapping.flat_param_shapes(abstract_model(config))))
        print(f"random checkpoint: {total / 2**30:.2f} GiB float32 in {shards} shards; "
              f"largest stacked parameter {largest / 2**20:.0f} MiB")
        for name, cli in [("hf-to-jax", ["hf-to-jax", "--input", str(root / "hf"), "--output",
                                         str(root / "jax"), "--no-progress"]),
                          ("jax-to-hf", ["jax-to-hf", "--input", str(root / "jax"), "--output",
                                         str(root / "hf_back"), "--no-progress"])]:
            seconds, peak = run_measured(cli)
            print(f"{name:10s} {seconds:6.1f} s  peak RSS {peak / 2**30:.2f} GiB "
                  f"({peak / total:.0%} of the checkpoint)")
        baseline = run_measured(["--help"])[1]
        print(f"(python + jax + orbax import baseline: peak RSS {baseline / 2**30:.2f} GiB)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
