"""Training metrics: model FLOPs per step, MFU, console progress, TensorBoard events.

MFU follows MaxText: model FLOPs of one train step (no rematerialisation counted) divided by
(step time x number of devices x peak bf16 FLOP/s of one device).
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
from absl import logging
from tqdm import tqdm

from llava_jax.models.config import LlavaConfig

# Dense bf16 peak FLOP/s per device, by a substring of `jax.devices()[0].device_kind`.
# Longer keys are tried first ("v5 lite" before "v5"). Override with log.peak_flops_per_device.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one device; None when unknown (e.g. CPU) and not overridden."""
    if override and override > 0:
        return float(override)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def train_step_flops(config: LlavaConfig, batch_rows: int, seq_len: int, images_per_row: int,
                     *, train_projector: bool, train_llm: bool, with_images: bool = True,
                     lm_head_rows: int | None = None) -> float:
    """Model FLOPs of one optimizer step over `batch_rows` rows of `seq_len` tokens.

    Counts matmuls (2 FLOPs per multiply-add) in the forward pass and the backward work that
    the frozen/trainable split actually needs: a block whose weights train costs 3x its forward
    (activation + weight gradients), a frozen block that gradients must flow through costs 2x,
    and a frozen block with nothing trainable upstream (CLIP) costs 1x. Attention over the
    padded row length, causal in the LLM (half the score matrix), full in CLIP.
    Args:
      batch_rows: rows per step, all micro-batches of all devices together.
      images_per_row: image slots per row (CLIP runs on every slot of an image batch).
      lm_head_rows: positions per row the LM head runs on (default: all `seq_len`, the
        standard model-FLOPs count; the train step may skip positions without a target).
    """
    vision, text = config.vision, config.text
    upstream_trains = train_projector  # only the projector sits between CLIP and the LLM
    flops = 0.0
    if with_images:
        images = batch_rows * images_per_row
        tokens_v = vision.num_positions
        dv, layers_v = vision.hidden_size, max(l % (vision.num_layers + 1)
                                               for l in config.feature_layers)
        per_layer = 2 * tokens_v * (4 * dv * dv + 2 * dv * vision.intermediate_size)
        per_layer += 4 * tokens_v * tokens_v * dv  # scores + weighted values
        patch = 2 * vision.num_patches * vision.patch_size ** 2 * vision.num_channels * dv
        flops += images * (layers_v * per_layer + patch)  # forward only: CLIP is frozen
        depth = config.projector_depth
        sizes = [config.projector_input_size] + [text.hidden_size] * depth
        proj = 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * images * config.num_image_tokens
        flops += proj * (3 if train_projector else 1)
    d, hd = text.hidden_size, text.resolved_head_dim
    layer_params = (2 * d * text.num_heads * hd + 2 * d * text.num_kv_heads * hd
                    + 3 * d * text.intermediate_size)
    tokens = batch_rows * seq_len
    head_tokens = batch_rows * (seq_len if lm_head_rows is None else lm_head_rows)
    dense = 2 * tokens * text.num_layers * layer_params + 2 * head_tokens * d * text.vocab_size
    attention = 2 * batch_rows * seq_len * seq_len * text.num_heads * hd * text.num_layers
    weights_factor = 3 if train_llm else (2 if upstream_trains else 1)
    attention_factor = 3 if (train_llm or upstream_trains) else 1
    flops += dense * weights_factor + attention * attention_factor
    return float(flops)


class TensorBoardWriter:
    """Scalars as TensorBoard event files (tensorboardX: no TensorFlow needed)."""

    def __init__(self, logdir: str):
        # Only here: tensorboardX imports torch when it is installed (measured 1.1 s), and
        # only runs that write event files should pay for it.
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class ProgressReporter:
    """Console progress (tqdm bar on a terminal, log lines always) plus TensorBoard.

    `report(step, values)` takes metric values averaged over the logging interval.
    """

    def __init__(self, *, total_steps: int, start_step: int, workdir: str | None,
                 tensorboard: bool, progress_bar: bool, prefix: str = ""):
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.prefix = prefix
        self.writer = TensorBoardWriter(os.path.join(workdir, "tensorboard")) if (
            tensorboard and workdir) else None
        self.bar = None
        if progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, desc=prefix or "train",
                            dynamic_ncols=True)

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        return elapsed / done * (self.total_steps - step) if done > 0 else float("nan")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def report(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.scalars(step, values)
        eta = self.eta_seconds(step)
        fields = [f"{name}={_fmt(value)}" for name, value in values.items() if value is not None]
        line = (f"{self.prefix}step {step}/{self.total_steps} " + " ".join(fields)
                + (f" eta={_duration(eta)}" if math.isfinite(eta) else ""))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={values.get('loss', float('nan')):.4f}")
            self.bar.write(line)
        else:
            logging.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class StepWindow:
    """Host-side counts between two log lines: steps, tokens, images, data wait, model FLOPs.

    flops_fn(rows, length, image_slots, with_images) -> model FLOPs of one step, where rows are
    all rows of the step over all processes.
    """

    def __init__(self, flops_fn):
        self.flops_fn = flops_fn
        self.reset()

    def reset(self):
        self.start = time.perf_counter()
        self.steps = self.tokens = self.images = 0
        self.data_wait = self.flops = 0.0

    def add(self, batch: dict, data_wait: float) -> None:
        """batch: the host arrays of one step, leaves [accum, rows, ...]."""
        processes = jax.process_count()
        accum, rows, length = batch["input_ids"].shape
        with_images = "pixel_values" in batch
        slots = batch["pixel_values"].shape[2] if with_images else 0
        self.steps += 1
        self.tokens += int((batch["segment_ids"] != 0).sum()) * processes
        self.images += int(batch["image_mask"].sum()) * processes if with_images else 0
        self.data_wait += data_wait
        self.flops += self.flops_fn(accum * rows * processes, length, slots, with_images)

    def summary(self, values: dict, peak: float | None, learning_rate: float) -> dict:
        """Averages since the last summary (and resets); `values` are the last step's metrics."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out = {"loss": float(values["loss"]), "grad_norm": float(values["grad_norm"]),
               "learning_rate": learning_rate, "step_time_s": elapsed / steps,
               "tokens_per_s": self.tokens / elapsed, "images_per_s": self.images / elapsed,
               "data_wait_s": self.data_wait / steps,
               "tflops_per_device": self.flops / elapsed / jax.device_count() / 1e12}
        if peak:
            out["mfu"] = self.flops / elapsed / (peak * jax.device_count())
        self.reset()
        return out
