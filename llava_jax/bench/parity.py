"""Training parity: llava_jax's train step against transformers + torch.optim, step by step.

`python -m llava_jax.bench train --parity [--stages=1,2] [--steps=50] [--accum=2] [--json=FILE]`

Both sides train the same tiny LLaVA (random weights, copied into transformers'
LlavaForConditionalGeneration by `convert.reference.transformers_llava`: the "same init" that
removes the two libraries' different initialisers from the comparison) on the same batches,
float32:

* data: our pipeline (`data.make_dataset`: span-by-span tokenization with labels, CLIP
  preprocessing, packing several samples per row with segment ids, length bucket padding) and
  the trainer's own stacking of `accum` micro-batches (`Trainer._next_batch`). Stage 1 =
  `plain` captions, one image each; stage 2 = `vicuna_v1`, 1-3 rounds, 0, 1 or 2 images per
  sample, image and text-only batches. The torch side gets the same samples unpacked, one per
  row, right-padded, with `attention_mask`; text-only micro-batches get `pixel_values=None`.
* loss: the mean over every target token of the step (all micro-batches, all devices):
  transformers' Trainer rule since `num_items_in_batch` (4.46+, `average_tokens_across_devices`
  default True), which the torch side follows by passing `num_items_in_batch` (the count of
  `labels[..., 1:] != -100` over the step's micro-batches, as `Trainer._get_num_items_in_batch`)
  to the model and summing the micro-batch gradients.
* optimizer: HF Trainer's AdamW groups (`Trainer.get_decay_parameter_names`: no decay on biases
  and norms), `get_cosine_schedule_with_warmup` with ceil(warmup_ratio x steps) warm-up steps
  (`TrainingArguments.get_warmup_steps`), `clip_grad_norm_(1.0)`, `scheduler.step()` after every
  `optimizer.step()`.
* trainable: stage 1 the projector; stage 2 projector + LLM (embeddings and LM head too); CLIP
  frozen on both sides (the original's `tune_mm_mlp_adapter` / stage-2 freezing).
* one legitimate difference is removed on the torch side: a trainable tensor the step did not
  use (the projector on an all-text step) has `grad=None` in torch and AdamW skips it (no
  decay, no momentum, no step count); ours sees a zero gradient. The original LLaVA sends a
  dummy image through the projector for text-only samples, and DeepSpeed ZeRO keeps flat
  gradient buffers, so it sees zeros too: the torch side sets such grads to zero.

Checks: per-step loss |ours - torch| / |torch| <= 1e-3 and the final trainable parameters
max |ours - torch| (elementwise, absolute) <= 1e-4. The last line printed is the largest of
both over all stages; the command exits 1 when either tolerance is exceeded.

`REFERENCE_VARIANTS` are deliberately wrong torch references (LR schedule one step early,
warm-up steps rounded down, decay on norms and biases, LLaVA's transformers-4.37 mean of
micro-batch means, None grads skipped): the test checks that each of them fails, so the
comparison can tell.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
import types
from typing import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from llava_jax import sharding, tree
from llava_jax.bench import common
from llava_jax.convert import mapping
from llava_jax.data import IGNORE_INDEX, IMAGE_TOKEN, default_data_config, make_dataset
from llava_jax.data.testing import build_test_tokenizer, write_dataset
from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.training.config import default_config
from llava_jax.training.state import build_setup
from llava_jax.training.trainer import Trainer

LOSS_RTOL = 1e-3  # per step, relative to the torch loss
PARAM_ATOL = 1e-4  # final trainable parameters, elementwise absolute
# Deliberately wrong torch references (see the module docstring): each must fail the check.
REFERENCE_VARIANTS = ("schedule_one_step_early", "warmup_steps_floor", "decay_norms_and_biases",
                      "mean_of_micro_means", "none_grads_skipped")
WORDS = ("a the cat dog red blue black apple apples table park runs two three left right one "
         "yes no picture image wooden what is in color it there are on describe detail "
         "question answer single word phrase").split()


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity run: a stage, its data and optimizer settings, the tiny model's size."""

    stage: int
    steps: int = 50
    rows: int = 4  # rows per micro-batch (ours: packed rows; torch: their samples, unpacked)
    accum: int = 2  # micro-batches per optimizer step
    packing: bool = True
    length: int = 192  # the one bucket (and max_length)
    learning_rate: float = 1e-3
    weight_decay: float = 0.1  # > 0, so the decay mask matters (LLaVA's recipes use 0)
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0
    seed: int = 0
    samples: int = 96  # records in the data file (the stream repeats them, reshuffled)
    text_share: float = 0.5  # stage 2: fraction of text-only samples (short: they pack densely)
    text_width: int = 64
    text_layers: int = 2
    vision_width: int = 32
    vision_layers: int = 2
    image_size: int = 32  # 8 px patches: 16 image tokens
    loss_chunk_size: int = 48  # ours: LM head in chunks (exercised; the loss is the same)
    # ours: 'full' with accum > 1 adds the layers' gradients into the sum inside the backward
    # (models/accumulate.py); 'none' the plain sum of jax.grad's.
    remat_policy: str = "none"


# ----------------------------------------------------------------------------------------------
# Data and model


def write_records(directory: str, stage: int, count: int, seed: int,
                  text_share: float = 0.5) -> dict:
    """LLaVA JSON + random-noise images of varied sizes: stage 1 captions (one image each);
    stage 2 conversations of 1-3 rounds, `text_share` of them text-only, the others with one
    image (or two, in the first two rounds, one in three of those with several rounds)."""
    rng = np.random.RandomState(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS, rng.randint(lo, hi + 1)))  # noqa: E731
    records, images = [], {}
    for index in range(count):
        if stage == 1:
            num_images, rounds = 1, 1
        else:
            rounds = int(rng.randint(1, 4))
            text_only = rng.rand() < text_share
            num_images = 0 if text_only else 1 + int(rounds > 1 and rng.rand() < 1 / 3)
        conversations, names = [], []
        for turn in range(rounds):
            question = words(2, 6) + "?"
            if turn < num_images:
                question = f"{IMAGE_TOKEN}\n{question}"
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": words(1, 3 if stage == 2 else 12)
                                  + "."})
        for slot in range(num_images):
            name = f"s{index}_{slot}.png"
            height, width = rng.randint(16, 49, 2)
            images[name] = Image.fromarray(rng.randint(0, 256, (height, width, 3), np.uint8))
            names.append(name)
        record = {"id": f"p{index}", "conversations": conversations}
        if names:
            record["image"] = names[0] if len(names) == 1 else names
        records.append(record)
    return write_dataset(directory, records, images)


def model_config(case: Case, tokenizer) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=case.vision_width, intermediate_size=2 * case.vision_width,
                            num_layers=case.vision_layers, num_heads=2,
                            image_size=case.image_size, patch_size=8),
        text=TextConfig(vocab_size=len(tokenizer), hidden_size=case.text_width,
                        intermediate_size=2 * case.text_width, num_layers=case.text_layers,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dtype="float32", param_dtype="float32",
        remat_policy=case.remat_policy)


def step_batches(case: Case, paths: dict, tokenizer, config: LlavaConfig) -> list[dict]:
    """`case.steps` host batches [accum, rows, ...] from our pipeline and the trainer's stacking."""
    data = default_data_config(case.stage)
    data.json_paths = (paths["json"],)
    data.image_roots = (paths["image_root"],)
    data.buckets = (case.length,)
    data.max_length = case.length
    data.packing = case.packing
    data.num_epochs = None
    data.read_threads = 1
    iterator = make_dataset(data, tokenizer, num_image_tokens=config.num_image_tokens,
                            image_token_index=config.image_token_index,
                            image_size=config.vision.image_size, batch_size=case.rows,
                            seed=case.seed, shard_index=0, shard_count=1,
                            pad_id=tokenizer.pad_token_id)
    # Trainer._next_batch needs only these two attributes: the run's exact stacking (micro-
    # batches padded to one length; pixel_values only when some micro-batch has images).
    stacker = types.SimpleNamespace(
        config=types.SimpleNamespace(optim=types.SimpleNamespace(grad_accum_steps=case.accum)),
        tokenizer=tokenizer)
    try:
        return [Trainer._next_batch(stacker, iterator) for _ in range(case.steps)]
    finally:
        iterator.close()


def unpack(micro: dict, config: LlavaConfig) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One micro-batch of ours -> its samples: (input_ids, labels, pixels [k, H, W, 3])."""
    samples = []
    pixels = micro.get("pixel_values")
    for row in range(micro["input_ids"].shape[0]):
        segments = micro["segment_ids"][row]
        slot = 0
        for segment in range(1, int(segments.max(initial=0)) + 1):
            where = segments == segment
            ids, labels = micro["input_ids"][row, where], micro["labels"][row, where]
            count = int(np.sum(ids == config.image_token_index)) // config.num_image_tokens
            if count:
                assert micro["image_mask"][row, slot:slot + count].all()
            images = pixels[row, slot:slot + count] if count else np.zeros((0,))
            slot += count
            samples.append((ids, labels, images))
    return samples


def torch_inputs(micro: dict, config: LlavaConfig, pad_id: int) -> dict:
    """The samples of one micro-batch as transformers inputs: a row each, right-padded."""
    import torch

    samples = unpack(micro, config)
    length = max(len(ids) for ids, _, _ in samples)
    ids = np.full((len(samples), length), pad_id, np.int64)
    labels = np.full((len(samples), length), IGNORE_INDEX, np.int64)
    mask = np.zeros((len(samples), length), np.int64)
    for row, (sample_ids, sample_labels, _) in enumerate(samples):
        ids[row, :len(sample_ids)] = sample_ids
        labels[row, :len(sample_ids)] = sample_labels
        mask[row, :len(sample_ids)] = 1
    images = [pixels for _, _, pixels in samples if len(pixels)]
    pixel_values = None
    if images:  # [n, H, W, 3] channels last -> torch [n, 3, H, W], in token order
        pixel_values = torch.from_numpy(np.ascontiguousarray(
            np.concatenate(images).transpose(0, 3, 1, 2)))
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask), "pixel_values": pixel_values}


def torch_names(setup, trainable: dict, frozen: dict) -> dict:
    """Our parameters under transformers 5 module names, as numpy."""
    from llava_jax.convert.reference import TRANSFORMERS_MODULE_PREFIXES  # imports torch

    out = {}
    for name, value in mapping.torch_tensors(setup.model(trainable, frozen)).items():
        for old, new in TRANSFORMERS_MODULE_PREFIXES.items():
            if name.startswith(old):
                out[new + name[len(old):]] = np.asarray(value, np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# The two sides


def train_config(case: Case):
    c = default_config(case.stage)
    c.optim.learning_rate = case.learning_rate
    c.optim.weight_decay = case.weight_decay
    c.optim.warmup_ratio = case.warmup_ratio
    c.optim.b1, c.optim.b2, c.optim.eps = case.b1, case.b2, case.eps
    c.optim.grad_clip_norm = case.grad_clip_norm
    c.optim.grad_accum_steps = case.accum
    c.optim.global_batch_size = case.rows * case.accum
    c.optim.total_steps = case.steps
    c.loss_chunk_size = case.loss_chunk_size
    return c


def initial_params(setup, seed: int) -> dict:
    """Random first weights from numpy: norm scales 1, biases N(0, 0.1) (not 0, so a decay
    that wrongly reaches them shows), the rest N(0, 0.02).

    Any weights do, as long as both sides start from the same ones (the torch side gets
    these, converted). Not `state.random_params`: its compile alone took 8 s of CPU, a
    sixth of the test's time, and the initialiser is not what this compares.
    """
    rng = np.random.RandomState(seed)

    def leaf(key_path, abstract):
        name = tree.flat_path(key_path).rsplit("/", 1)[-1]
        if name == "scale":
            return np.ones(abstract.shape, abstract.dtype)
        std = 0.1 if name == "bias" else 0.02
        return rng.normal(0.0, std, abstract.shape).astype(abstract.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, setup.abstract)
    return jax.device_put(params, setup.shardings)


def run_ours(case: Case, config: LlavaConfig, batches: list[dict]) -> dict:
    """Our train step over `batches` from random weights; the first weights come back too."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              jax.devices()[:1])
    setup = build_setup(train_config(case), config, mesh, total_steps=case.steps)
    trainable, frozen = setup.split(initial_params(setup, case.seed))
    initial_model = setup.model(trainable, frozen)  # what the torch side starts from
    trainable = jax.tree.map(lambda x: x.copy(), trainable)  # donated by every step
    opt_state = setup.init_optimizer(trainable)
    losses, lrs, targets, grad_norms = [], [], [], []
    for step, batch in enumerate(batches):
        trainable, opt_state, metrics = setup.train_step(
            trainable, frozen, opt_state, sharding.global_batch(batch, mesh))
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
            raise FloatingPointError(f"llava_jax: non-finite loss at step {step + 1}")
        losses.append(float(metrics["loss"]))
        lrs.append(float(setup.schedule(step)))
        targets.append(int(metrics["target_tokens"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return {"initial_model": initial_model, "final": torch_names(setup, trainable, frozen),
            "losses": losses, "lrs": lrs, "targets": targets, "grad_norms": grad_norms}


def torch_trainable(name: str, stage: int) -> bool:
    if stage == 1:
        return name.startswith("model.multi_modal_projector.")
    return not name.startswith("model.vision_tower.")


def run_torch(case: Case, config: LlavaConfig, batches: list[dict], initial_model,
              variant: str = "reference") -> dict:
    """transformers + torch.optim.AdamW, HF Trainer's rules (see the module docstring), from
    `initial_model`'s weights. `variant` picks one of REFERENCE_VARIANTS instead."""
    import torch

    if variant != "reference" and variant not in REFERENCE_VARIANTS:
        raise ValueError(f"variant={variant!r}: use 'reference' or one of {REFERENCE_VARIANTS}")
    # One thread: this model is tiny, and on a shared 2-core machine torch's spinning threads
    # made a step 80x slower (0.3 s vs 27 s for six steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_torch(case, config, batches, initial_model, variant)
    finally:
        torch.set_num_threads(threads)


def _run_torch(case, config, batches, initial_model, variant):
    import torch
    import transformers

    from llava_jax.convert.reference import transformers_llava

    model = transformers_llava(initial_model, attn_implementation="eager", train=True)
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if torch_trainable(n, case.stage)}
    for name, param in named.items():
        param.requires_grad = name in trainable
    initial = {n: p.detach().numpy().copy() for n, p in trainable.items()}
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    if variant == "decay_norms_and_biases":
        decay = set(trainable)
    groups = [{"params": [p for n, p in trainable.items() if n in decay],
               "weight_decay": case.weight_decay},
              {"params": [p for n, p in trainable.items() if n not in decay],
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=case.learning_rate, betas=(case.b1, case.b2),
                                  eps=case.eps)
    warmup = math.ceil(case.steps * case.warmup_ratio)  # TrainingArguments.get_warmup_steps
    if variant == "warmup_steps_floor":
        warmup = int(case.steps * case.warmup_ratio)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, case.steps)
    if variant == "schedule_one_step_early":
        optimizer.step()  # no grads yet: a no-op that lets the scheduler advance
        scheduler.step()
    losses, lrs, targets = [], [], []
    for batch in batches:
        micro = [torch_inputs(jax.tree.map(lambda x: x[i], batch), config, config.pad_token_id)
                 for i in range(batch["input_ids"].shape[0])]
        num_items = sum(int((m["labels"][..., 1:] != IGNORE_INDEX).sum()) for m in micro)
        lrs.append(scheduler.get_last_lr()[0])
        total = 0.0
        for inputs in micro:
            if variant == "mean_of_micro_means":  # transformers 4.37 (LLaVA's pin)
                loss = model(**inputs).loss / len(micro)
            else:
                loss = model(**inputs, num_items_in_batch=num_items).loss
            loss.backward()
            total += float(loss.detach())
        if variant != "none_grads_skipped":
            for param in trainable.values():
                if param.grad is None:  # unused this step: a zero gradient, as ours
                    param.grad = torch.zeros_like(param)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), case.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        losses.append(total)
        targets.append(num_items)
    final = {n: p.detach().numpy().copy() for n, p in trainable.items()}
    return {"initial": initial, "final": final, "losses": losses, "lrs": lrs, "targets": targets}


# ----------------------------------------------------------------------------------------------
# Comparison


def compare(ours: dict, theirs: dict) -> dict:
    """Largest per-step loss relative difference and final-parameter absolute difference."""
    if ours["targets"] != theirs["targets"]:
        raise AssertionError(f"the two sides saw different target tokens: {ours['targets']} vs "
                             f"{theirs['targets']}")
    loss = np.asarray(ours["losses"], np.float64)
    ref = np.asarray(theirs["losses"], np.float64)
    loss_rel = np.abs(loss - ref) / np.abs(ref)
    param_diff, param_name, moved = 0.0, "", 0.0
    for name, value in theirs["final"].items():
        diff = float(np.max(np.abs(ours["final"][name] - value)))
        moved = max(moved, float(np.max(np.abs(value - theirs["initial"][name]))))
        if diff >= param_diff:
            param_diff, param_name = diff, name
    return {"loss_rel": loss_rel.tolist(), "max_loss_rel": float(loss_rel.max()),
            "worst_step": int(loss_rel.argmax()) + 1, "max_param_abs": param_diff,
            "worst_param": param_name, "max_param_moved": moved,
            "passed": bool(loss_rel.max() <= LOSS_RTOL and param_diff <= PARAM_ATOL)}


def run_case(case: Case, workdir: str, variants: Sequence[str] = ("reference",)) -> dict:
    """Data, both sides, comparison. {"case", "ours", variant: {"torch", "diff"}, "times"}."""
    tokenizer = build_test_tokenizer()
    config = model_config(case, tokenizer)
    paths = write_records(os.path.join(workdir, f"stage{case.stage}"), case.stage, case.samples,
                          case.seed, case.text_share)
    start = time.perf_counter()
    batches = step_batches(case, paths, tokenizer, config)
    times = {"data": time.perf_counter() - start}
    start = time.perf_counter()
    ours = run_ours(case, config, batches)
    times["llava_jax"] = time.perf_counter() - start
    result = {"case": dataclasses.asdict(case), "ours": ours, "times": times,
              "batches": describe(batches)}
    for variant in variants:
        start = time.perf_counter()
        theirs = run_torch(case, config, batches, ours["initial_model"], variant)
        times[f"torch_{variant}"] = time.perf_counter() - start
        result[variant] = {"torch": theirs, "diff": compare(ours, theirs)}
    return result


def describe(batches: list[dict]) -> dict:
    """What the steps held: samples, packed rows, image / text-only micro-batches."""
    samples = sum(int(b["segment_ids"].max(-1).sum()) for b in batches)
    rows = sum(int((b["segment_ids"] > 0).any(-1).sum()) for b in batches)
    micro = [(b, i) for b in batches for i in range(b["input_ids"].shape[0])]
    with_images = sum(1 for b, i in micro if "image_mask" in b and b["image_mask"][i].any())
    images = sum(int(b["image_mask"].sum()) for b in batches if "image_mask" in b)
    return {"samples": samples, "rows": rows, "micro_batches": len(micro),
            "image_micro_batches": with_images, "text_micro_batches": len(micro) - with_images,
            "text_steps": sum(1 for b in batches if "pixel_values" not in b),
            "images": images, "length": int(batches[0]["input_ids"].shape[-1])}


def print_case(result: dict, every: int = 1) -> None:
    case, ours = result["case"], result["ours"]
    theirs, diff = result["reference"]["torch"], result["reference"]["diff"]
    b = result["batches"]
    print(f"\n[stage {case['stage']}] {case['steps']} steps x {case['accum']} micro-batches x "
          f"{case['rows']} rows x {b['length']} tokens (packing {case['packing']}): "
          f"{b['samples']} samples in {b['rows']} rows, {b['images']} images, "
          f"{b['image_micro_batches']} image / {b['text_micro_batches']} text-only micro-batches "
          f"({b['text_steps']} all-text steps);"
          f" lr {case['learning_rate']}, weight decay {case['weight_decay']}, warm-up ratio "
          f"{case['warmup_ratio']}")
    # grad norm: ours, before clipping (clipping acts when it is > grad_clip_norm).
    print(f"{'step':>4} {'lr ours':>10} {'lr torch':>10} {'targets':>7} {'grad norm':>9} "
          f"{'loss ours':>10} {'loss torch':>10} {'rel diff':>9}")
    for step in range(case["steps"]):
        if (step + 1) % every and step + 1 not in (1, case["steps"]):
            continue
        print(f"{step + 1:4d} {ours['lrs'][step]:10.3e} {theirs['lrs'][step]:10.3e} "
              f"{ours['targets'][step]:7d} {ours['grad_norms'][step]:9.3f} "
              f"{ours['losses'][step]:10.6f} {theirs['losses'][step]:10.6f} "
              f"{diff['loss_rel'][step]:9.1e}")
    print(f"[stage {case['stage']}] max loss rel diff {diff['max_loss_rel']:.1e} (step "
          f"{diff['worst_step']}); final params max abs diff {diff['max_param_abs']:.1e} "
          f"({diff['worst_param']}; params moved up to {diff['max_param_moved']:.1e}); "
          + ", ".join(f"{k} {v:.1f}s" for k, v in result["times"].items()))
    for variant in REFERENCE_VARIANTS:
        if variant in result:
            d = result[variant]["diff"]
            verdict = "not detected" if d["passed"] else "detected"
            if variant == "none_grads_skipped" and not b["text_steps"]:
                verdict += " (no all-text step: the same as the reference here)"
            print(f"  wrong reference {variant}: loss rel {d['max_loss_rel']:.1e}, params "
                  f"{d['max_param_abs']:.1e} -> {verdict}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llava_jax.bench train --parity",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--rows", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--no-packing", dest="packing", action="store_false")
    parser.add_argument("--remat_policy", default="none",
                        help="ours: none | full (full + accum > 1 accumulates in the backward)")
    parser.add_argument("--every", type=int, default=1, help="print every N-th step")
    parser.add_argument("--variants", action="store_true",
                        help="also run the deliberately wrong references (each must be detected)")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch  # the `torch` extra

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}); float32; tolerances: loss "
          f"{LOSS_RTOL:g} relative per step, final trainable params {PARAM_ATOL:g} absolute",
          flush=True)
    variants = ("reference",) + (REFERENCE_VARIANTS if args.variants else ())
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for stage in [int(s) for s in args.stages.split(",") if s]:
            case = Case(stage=stage, steps=args.steps, accum=args.accum, rows=args.rows,
                        packing=args.packing, remat_policy=args.remat_policy)
            results[stage] = run_case(case, workdir, variants)
            print_case(results[stage], args.every)
    diffs = [r["reference"]["diff"] for r in results.values()]
    loss_rel = max(d["max_loss_rel"] for d in diffs)
    param_abs = max(d["max_param_abs"] for d in diffs)
    passed = all(d["passed"] for d in diffs)
    summary = {"max_loss_rel": loss_rel, "max_param_abs": param_abs, "passed": passed,
               "stages": results}
    common.write_json(args.json, _jsonable(summary))
    print(f"parity stages {args.stages}, {args.steps} steps: max loss rel diff {loss_rel:.1e} "
          f"(tol {LOSS_RTOL:g}), max final param abs diff {param_abs:.1e} (tol {PARAM_ATOL:g}): "
          f"{'OK' if passed else 'FAILED'}", flush=True)
    if not passed:
        raise SystemExit(1)
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()
                if k not in ("final", "initial", "initial_model")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    main(sys.argv[1:])
