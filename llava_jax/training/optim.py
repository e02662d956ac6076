"""What is optimised and how: the trainable split, AdamW with LLaVA's settings, the schedule.

Freezing is structural: the parameters are a nested dict, split by a regex on their flat
path into a `trainable` and a `frozen` sub-tree (both nested dicts). The optimizer is built
over the trainable sub-tree only, so frozen parameters hold no optimizer state at all and
receive no gradient computation for their weights.
"""

from __future__ import annotations

import math
import re

import jax
import optax

from llava_jax import tree

# LLaVA: stage 1 trains the projector; stage 2 the projector and the LLM; CLIP never trains.
STAGE_TRAINABLE = {
    1: r"^multi_modal_projector/",
    2: r"^(multi_modal_projector|language_model)/",
}
NO_DECAY_LEAVES = ("bias", "scale")  # biases and norm scales (HF Trainer's rule)


# A LoRA run (config.lora.rank > 0): the adapters and the projector, in any stage.
LORA_TRAINABLE = r"(^multi_modal_projector/|/lora_[ab]$)"
PROJECTOR_GROUP = r"^multi_modal_projector/"  # the leaves lora.projector_learning_rate applies to


def stage_trainable_pattern(stage: int, override: str = "", *, lora: bool = False) -> str:
    if override:
        return override
    if lora:
        return LORA_TRAINABLE
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage={stage}: use 1 (pretraining) or 2 (instruction tuning).")
    return STAGE_TRAINABLE[stage]


def split_params(params: dict, trainable_pattern: str) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; a leaf is trainable if the regex matches its path."""
    trainable, frozen = tree.split(params, trainable_pattern)
    if not trainable:
        raise ValueError(f"trainable={trainable_pattern!r} matches no parameter.")
    return trainable, frozen


merge_params = tree.merge  # (trainable, frozen) -> all parameters


def decay_mask(params: dict) -> dict:
    """True where weight decay applies: every leaf except biases and norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: tree.flat_path(kp).rsplit("/", 1)[-1] not in NO_DECAY_LEAVES, params)


def schedule_steps(optim_config, total_steps: int) -> int:
    """Warm-up steps: ceil(warmup_ratio * total), as HF's Trainer."""
    return int(math.ceil(optim_config.warmup_ratio * total_steps))


def make_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to lr, then 'cosine' (to 0) or 'constant'."""
    warmup = schedule_steps(optim_config, total_steps)
    lr = optim_config.learning_rate
    if optim_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if optim_config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
            [warmup])
    raise ValueError(f"optim.schedule={optim_config.schedule!r}: use 'cosine' or 'constant'.")


def make_optimizer(optim_config, total_steps: int, *,
                   projector_learning_rate: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip-by-global-norm then AdamW (decay masked off biases and norms).

    Gradient accumulation happens inside the train step (a scan over micro-batches), so the
    optimizer sees one already-averaged gradient per step.
    projector_learning_rate: the projector's peak lr (the original's mm_projector_lr), on the
    same warm-up + decay shape; the rest keeps optim.learning_rate. Adam's moments stay one
    tree: AdamW = scale_by_adam, decay, scale_by_learning_rate, and only the last step differs
    per group. Returns the optimizer and the main group's schedule.
    """
    schedule = make_schedule(optim_config, total_steps)
    parts = []
    if optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    if projector_learning_rate is None:
        parts.append(optax.adamw(
            schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
            weight_decay=optim_config.weight_decay, mask=decay_mask))
        return optax.chain(*parts), schedule
    projector_schedule = _scaled_schedule(optim_config, total_steps, projector_learning_rate)
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda kp, _: "projector" if re.search(PROJECTOR_GROUP, tree.flat_path(kp)) else "rest",
        params)
    parts += [
        optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps),
        optax.add_decayed_weights(optim_config.weight_decay, decay_mask),
        optax.multi_transform({"rest": optax.scale_by_learning_rate(schedule),
                               "projector": optax.scale_by_learning_rate(projector_schedule)},
                              labels),
    ]
    return optax.chain(*parts), schedule


def _scaled_schedule(optim_config, total_steps: int, peak: float) -> optax.Schedule:
    """`make_schedule`'s shape with another peak learning rate."""
    base = make_schedule(optim_config, total_steps)
    ratio = peak / optim_config.learning_rate
    return lambda step: base(step) * ratio
