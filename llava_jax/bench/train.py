"""Train-step speed: llava_jax vs transformers' PyTorch LlavaForConditionalGeneration.

`python -m llava_jax.bench train [--repeats=5] [--dtypes=float32,bfloat16] [--family=vicuna]
[--json=FILE]`

Both sides train the same small LLaVA (CLIP 256 wide x 4 layers at 112 px = 64 image tokens;
LLaMA 512 wide x 4 layers, 8 heads, MLP 1376, vocab 32064) on the same batch (4 rows x 256
tokens, one image per row), stage-2 style: projector + LLM train with AdamW, CLIP frozen.
Both start from the same random weights. `--family=llama3|mistral|qwen2` gives the model
that family's switches at this size (FAMILIES: grouped-query attention, llama3 rope scaling, a
sliding window of half the row, Qwen2's q/k/v biases over a SigLIP tower); the reference is then
transformers' class for it. `--family=next` tiles the images as LLaVA-NeXT does (anyres,
spatial_unpad, 112 px tiles on pinpoints 1x2 / 2x1 / 2x2): rows of 384 tokens, one image per
row of the sizes in NEXT_IMAGE_SIZES (rows x cols: wide 1x2, landscape 2x2, tall 2x1,
portrait 2x2 tiles + the base tile each: 3 / 5 / 3 / 5 of 5 tile slots per row), its
placeholder count following from its size (the same on both sides); the batch is
data/batching.py's tiled training form and the reference transformers'
LlavaNextForConditionalGeneration (pixel_values [images, tiles, 3, S, S] + image_sizes).
bfloat16 = bf16 compute with float32 master weights (llava_jax `dtype=bfloat16`; torch
`autocast(cpu, bfloat16)`).

Each repeat runs one step of every (side, dtype), alternating the order; medians over repeats.
MFU = model FLOPs per step (llava_jax.training.metrics.train_step_flops) / step time / peak, where
the peak is measured in the same run: a bf16 jnp.dot (4096^2 x 4096) accumulating in float32.
Model FLOPs count the LM head on every position (the standard definition); llava_jax runs it
only on the positions with a target (half of them here, `lm_head_target_fraction`), so
"HFU" (the FLOPs llava_jax actually executes / time / peak) is printed next to it. Tiled
(`next`): model FLOPs count the tower (forward) and projector on every real tile of a row's
image (base tile included: 16 tiles per step here, what torch runs); llava_jax executes them on
every tile slot (20: fixed shapes, the empty slots are computed too), which HFU counts.

A third side, "llava_jax+lora" (`--lora_rank`, default 16 = the recipe's 128 / 4096 of the
width; 0 = off), trains the same model with LoRA adapters on the LLM's projections and the
projector (the frozen base held in the compute dtype), from the same weights: its first loss
equals llava_jax's (B starts at zero). "peak GiB" is the compiled step's buffer plan (arguments
+ temporaries + outputs - donated), the same figure memory_plan reports; torch has none.

`python -m llava_jax.bench train --parity [--stages=1,2] [--steps=50] ...` runs the training
parity check instead (llava_jax/bench/parity.py: 50 steps against transformers +
torch.optim.AdamW; exits 1 when a tolerance is exceeded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llava_jax import sharding
from llava_jax.bench import common, parity
from llava_jax.data import anyres, batching
from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.models import lora
from llava_jax.models.llava import abstract_params
from llava_jax.training import metrics, optim
from llava_jax.training.config import default_config
from llava_jax.training.loss import lm_head_capacity
from llava_jax.training.state import build_setup, random_params

BATCH, SEQ, IMAGE_TOKENS = 4, 256, 64


# The decoder families' switches at the benchmark's size (`--family`): each the release's
# attention shape (grouped-query: 2 KV heads for 8) and the switch that makes it that family.
FAMILIES = {
    "vicuna": dict(text={}),  # LLaVA-1.5: multi-head, plain rotary
    "llama3": dict(text=dict(num_kv_heads=2, rope_theta=500000.0, rope_scaling_factor=8.0,
                             rope_scaling_type="llama3",
                             # shorter than the row, so every frequency band of the scaling occurs
                             rope_original_max_position_embeddings=64)),
    "mistral": dict(text=dict(model_type="mistral", num_kv_heads=2, sliding_window=SEQ // 2)),
    # LLaVA-OneVision's pairing: Qwen2 over SigLIP (no class token: 64 patches, all kept).
    "qwen2": dict(text=dict(model_type="qwen2", num_kv_heads=2, qkv_bias=True,
                            tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
                  vision=dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6),
                  vision_feature_layer=-1, vision_feature_select_strategy="cls_patch"),
    # LLaVA-NeXT (v1.6) tiling over the vicuna decoder: pinpoints of 112 px tiles.
    "next": dict(text={}, image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
                 image_grid_pinpoints=((112, 224), (224, 112), (224, 224))),
}
# `next`: each row's image (height, width): wide (1x2 tiles: 200 placeholders), 4:3 landscape
# (2x2, its padding's grid rows cropped: 268), tall (2x1: 208), 3:4 portrait (2x2, columns
# cropped: 272).
NEXT_IMAGE_SIZES = ((150, 320), (480, 640), (336, 160), (640, 480))


def row_length(config) -> int:
    """Tokens per row: SEQ; a tiled image's placeholders (up to 272) need more room: 1.5 x SEQ,
    below attention.SHORT_QUERIES (512), so 'auto' attention stays `xla` as for the other
    families and their figures compare."""
    return SEQ + SEQ // 2 if config.anyres else SEQ


def image_rows(config) -> list[tuple[int, int]]:
    """(placeholders, tiles) of each row's image: (64, 1) each unless tiled."""
    if not config.anyres:
        return [(IMAGE_TOKENS, 1)] * BATCH
    spec = anyres.AnyresSpec.from_config(config)
    layouts = [anyres.image_layout(h, w, spec) for h, w in NEXT_IMAGE_SIZES]
    return [(layout.num_tokens(spec), layout.num_tiles) for layout in layouts]


def bench_config(dtype: str, family: str = "vicuna") -> LlavaConfig:
    spec = dict(FAMILIES[family])
    text = dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=4,
                num_heads=8, num_kv_heads=8, max_position_embeddings=2048)
    return LlavaConfig(
        vision=VisionConfig(**{**common.small_clip(), **spec.pop("vision", {})}),
        text=TextConfig(**{**text, **spec.pop("text")}),
        image_token_index=32000, pad_token_id=32001, dtype=dtype, param_dtype="float32",
        # 4 layers: unrolled, as configs/demo.py runs small models on CPU (a scan stacks every
        # layer's activations for the backward: 12% of this step, BUILD_NOTES "A faster step").
        remat_policy="none", scan_layers=False, **spec)


def make_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """One image per row: BOS, its image tokens, text; labels on the second half of the row
    (its text: tiled images' placeholders may reach into it). Tiled: data/batching.py's form."""
    rng = np.random.RandomState(seed)
    seq = row_length(config)
    input_ids = rng.randint(3, 32000, (BATCH, seq)).astype(np.int32)
    input_ids[:, 0] = 1
    for row, (tokens, _) in enumerate(image_rows(config)):
        input_ids[row, 1:1 + tokens] = config.image_token_index
    labels = np.full((BATCH, seq), -100, np.int32)
    labels[:, seq // 2:] = input_ids[:, seq // 2:]
    labels[input_ids == config.image_token_index] = -100
    size = config.vision.image_size
    if config.anyres:
        spec = anyres.AnyresSpec.from_config(config)
        rows = []
        for row, (h, w) in enumerate(NEXT_IMAGE_SIZES):
            layout = anyres.image_layout(h, w, spec)
            rows.append([{"input_ids": input_ids[row], "labels": labels[row], "layouts": [layout],
                          "pixel_values": rng.randn(layout.num_tiles, size, size, 3)
                          .astype(np.float32)}])
        return batching.assemble_batch(rows, batch_size=BATCH, buckets=[seq],
                                       max_images_per_row=spec.max_tiles, image_size=size,
                                       pad_id=config.pad_token_id, tiled=spec)
    return {"input_ids": input_ids, "labels": labels,
            "segment_ids": np.ones((BATCH, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (BATCH, seq)).copy(),
            "pixel_values": rng.randn(BATCH, 1, size, size, 3).astype(np.float32),
            "image_mask": np.ones((BATCH, 1), bool)}


class JaxSide:
    def __init__(self, dtype: str, params: dict | None, lora_rank: int = 0,
                 family: str = "vicuna"):
        self.config = bench_config(dtype, family)
        train_config = default_config(stage=2)
        if lora_rank:
            train_config.lora.rank, train_config.lora.alpha = lora_rank, 2.0 * lora_rank
        train_config.loss_chunk_size = 0
        # Positions per row the LM head runs on (every target fits: half the row has labels).
        self.lm_head_rows = lm_head_capacity(row_length(self.config),
                                             train_config.lm_head_target_fraction)
        train_config.optim.learning_rate = 1e-5
        mesh = sharding.make_mesh(ml_collections.ConfigDict(
            {"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
        self.setup = build_setup(train_config, self.config, mesh, total_steps=100)
        if params is None:
            params = random_params(self.config, 0, self.setup.shardings)
        self.params = params
        if lora_rank:  # the same base weights, adapters added (B = 0)
            model = _as_model(self.config, params)
            lora.apply_lora(model, self.setup.lora, adapter_dtype=jnp.float32)
            params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype),
                                  nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                  self.setup.abstract)
        self.trainable, self.frozen = self.setup.split(params)
        self.trainable = jax.tree.map(lambda x: x.copy(), self.trainable)  # donated each step
        self.opt_state = jax.jit(self.setup.tx.init)(self.trainable)
        batch = make_batch(self.config)
        self.batch = {k: jax.device_put(v[None]) for k, v in batch.items()}

    def peak_bytes(self) -> int:
        """The compiled step's buffer plan: arguments + temporaries + outputs - donated."""
        memory = self.setup.train_step.lower(self.trainable, self.frozen, self.opt_state,
                                             self.batch).compile().memory_analysis()
        return (memory.argument_size_in_bytes + memory.temp_size_in_bytes
                + memory.output_size_in_bytes - memory.alias_size_in_bytes)

    def __call__(self) -> float:
        start = time.perf_counter()
        self.trainable, self.opt_state, step_metrics = self.setup.train_step(
            self.trainable, self.frozen, self.opt_state, self.batch)
        loss = float(jax.device_get(step_metrics["loss"]))
        self.elapsed = time.perf_counter() - start
        return loss


class TorchSide:
    def __init__(self, dtype: str, params: dict, family: str = "vicuna"):
        # Here, not at the top: torch is optional (the `torch` extra); only this side needs it.
        import torch

        from llava_jax.convert.reference import transformers_llava  # imports torch

        config = bench_config("float32", family)
        self.model = transformers_llava(_as_model(config, params), attn_implementation="sdpa",
                                        train=True)
        for name, param in self.model.named_parameters():
            param.requires_grad = "vision_tower" not in name
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
        batch = make_batch(config)
        # One image per row, channels first: [B, 3, S, S]; tiled: its tiles [B, T, 3, S, S]
        # (transformers keeps the first tiles its image_sizes call for).
        pixels = batch["pixel_values"][:, :, 0] if config.anyres else batch["pixel_values"][:, 0]
        self.inputs = {
            "input_ids": torch.from_numpy(batch["input_ids"]).long(),
            "labels": torch.from_numpy(batch["labels"]).long(),
            "attention_mask": torch.ones(batch["input_ids"].shape, dtype=torch.long),
            "pixel_values": torch.from_numpy(np.moveaxis(pixels, -1, -3).copy()),
        }
        if config.anyres:
            self.inputs["image_sizes"] = torch.tensor(NEXT_IMAGE_SIZES)
        self.autocast = dtype == "bfloat16"
        self.torch = torch

    def __call__(self) -> float:
        torch = self.torch
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                       1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.elapsed = time.perf_counter() - start
        return value


def _as_model(config, params):
    """A LlavaModel holding `params` (what mapping.torch_tensors reads)."""
    return nnx.merge(abstract_params(config)[0], params)


def measure_peak(repeats: int = 3) -> float:
    """bf16 x bf16 -> f32 matmul FLOP/s (the peak this machine's XLA reaches)."""
    n = 4096
    a = jnp.ones((n, n), jnp.bfloat16)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--lora_rank", type=int, default=16,
                        help="rank of the llava_jax+lora side (0 = no LoRA side)")
    parser.add_argument("--family", default="vicuna", choices=sorted(FAMILIES),
                        help="decoder family of the benchmark model (its switches at this "
                             "size; both sides: transformers' Llama / Mistral / Qwen2 classes); "
                             "next: LLaVA-NeXT tiling (LlavaNextForConditionalGeneration)")
    parser.add_argument("--parity", action="store_true",
                        help="instead: training parity with PyTorch (llava_jax.bench.parity; "
                        "see `--parity --help` for its flags)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--parity" in argv:  # its own flags and output (bench/parity.py)
        return parity.main([arg for arg in argv if arg != "--parity"])
    args = parse_args(argv)
    import torch  # optional dependency (the `torch` extra): only a run needs it, not --help

    dtypes = [d for d in args.dtypes.split(",") if d]
    family = args.family
    config = bench_config("float32", family)
    seq, rows = row_length(config), image_rows(config)
    images = (f"{IMAGE_TOKENS} image tokens" if not config.anyres else
              "image tokens / tiles per row " + ", ".join(f"{n} / {t}" for n, t in rows)
              + f" ({config.max_tiles} tile slots)")
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}); batch {BATCH} x {seq} tokens, "
          f"{images}; projector + LLM train, vision tower frozen; family {family}", flush=True)
    reference = JaxSide("float32", None, family=family)
    shared = jax.tree.map(np.asarray, reference.params)
    sides = {}
    for dtype in dtypes:
        sides[("llava_jax", dtype)] = (reference if dtype == "float32"
                                       else JaxSide(dtype, shared, family=family))
        sides[("torch", dtype)] = TorchSide(dtype, shared, family)
        if args.lora_rank:
            sides[("llava_jax+lora", dtype)] = JaxSide(dtype, shared, args.lora_rank, family)
    for side in sides.values():
        for _ in range(args.warmup):
            side()
    times = {key: [] for key in sides}
    first_loss = {}
    for repeat in range(args.repeats):
        for key in common.alternate(sides, repeat):
            loss = sides[key]()
            first_loss.setdefault(key, loss)
            times[key].append(sides[key].elapsed)
    peak = measure_peak()
    kw = dict(train_projector=True, train_llm=True)
    # Model FLOPs: the tower on each row's real tiles; llava_jax executes every tile slot.
    flops = sum(metrics.train_step_flops(config, 1, seq, tiles, **kw) for _, tiles in rows)
    slots = reference.batch["pixel_values"].shape[2]
    head_rows = reference.lm_head_rows
    executed = {"llava_jax": metrics.train_step_flops(config, BATCH, seq, slots, **kw,
                                                      lm_head_rows=head_rows), "torch": flops}
    tokens = BATCH * seq
    result = {"family": family, "peak_bf16_flops": peak, "model_flops_per_step": flops,
              "llava_jax_executed_flops_per_step": executed["llava_jax"], "rows": []}
    print(f"measured bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s; model FLOPs/step "
          f"{flops / 1e9:.1f} G (llava_jax executes {executed['llava_jax'] / 1e9:.1f} G: LM head "
          f"on {head_rows} of {seq} positions per row)")
    print(f"{'side':<15} {'dtype':<9} {'s/step':>8} {'tokens/s':>9} {'MFU':>6} {'HFU':>6} "
          f"{'loss':>8} {'peak GiB':>9}")
    for key in sides:
        median = statistics.median(times[key])
        # MFU / HFU count full training's FLOPs; a LoRA step skips the frozen weights'
        # gradients, so they are not comparable there (left out).
        full = key[0] in executed
        row = {"side": key[0], "dtype": key[1], "seconds_per_step": median,
               "tokens_per_s": tokens / median,
               "mfu": flops / median / peak if full else None,
               "hfu": executed[key[0]] / median / peak if full else None,
               "first_loss": first_loss[key],
               "peak_bytes": sides[key].peak_bytes() if key[0] != "torch" else None}
        result["rows"].append(row)
        percent = lambda x: f"{x:6.1%}" if x is not None else f"{'-':>6}"
        peak_gib = f"{row['peak_bytes'] / 2**30:9.3f}" if row["peak_bytes"] else f"{'-':>9}"
        print(f"{key[0]:<15} {key[1]:<9} {median:8.3f} {row['tokens_per_s']:9.0f} "
              f"{percent(row['mfu'])} {percent(row['hfu'])} {row['first_loss']:8.4f} {peak_gib}")
    median = {key: statistics.median(value) for key, value in times.items()}
    for dtype in dtypes:
        ratio = median[("torch", dtype)] / median[("llava_jax", dtype)]
        result[f"speedup_{dtype}"] = ratio
        print(f"llava_jax / torch tokens/s, {dtype}: {ratio:.2f}x")
    best = {side: min((median[(side, d)], d) for d in dtypes) for side in ("llava_jax", "torch")}
    result["speedup_best"] = best["torch"][0] / best["llava_jax"][0]
    print(f"llava_jax best ({best['llava_jax'][1]}) / torch best ({best['torch'][1]}) tokens/s: "
          f"{result['speedup_best']:.2f}x")
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
