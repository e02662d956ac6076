"""What is optimised and how: trainable split, the loss, AdamW with LLaVA's settings, schedule.

Freezing is structural: the parameters are a nested dict, split by a regex on their flat
path into a `trainable` and a `frozen` sub-tree (both nested dicts). The optimizer is built
over the trainable sub-tree only, so frozen parameters hold no optimizer state at all and
receive no gradient computation for their weights.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax

from llava_jax.convert.mapping import flatten, unflatten
from llava_jax.sharding import flat_path

# LLaVA: stage 1 trains the projector; stage 2 the projector and the LLM; CLIP never trains.
STAGE_TRAINABLE = {
    1: r"^multi_modal_projector/",
    2: r"^(multi_modal_projector|language_model)/",
}
NO_DECAY_LEAVES = ("bias", "scale")  # biases and norm scales (HF Trainer's rule)
IGNORE_INDEX = -100  # labels that carry no loss


def stage_trainable_pattern(stage: int, override: str = "") -> str:
    if override:
        return override
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage={stage}: use 1 (pretraining) or 2 (instruction tuning).")
    return STAGE_TRAINABLE[stage]


def split_params(params: dict, trainable_pattern: str) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; a leaf is trainable if the regex matches its path."""
    regex = re.compile(trainable_pattern)
    flat = flatten(params)
    trainable = unflatten({p: v for p, v in flat.items() if regex.search(p)})
    frozen = unflatten({p: v for p, v in flat.items() if not regex.search(p)})
    if not trainable:
        raise ValueError(f"trainable={trainable_pattern!r} matches no parameter.")
    return trainable, frozen


def merge_params(first: dict, second: dict) -> dict:
    """Deep union of two disjoint nested dicts."""
    out = dict(first)
    for key, value in second.items():
        if key in out and isinstance(value, dict):
            out[key] = merge_params(out[key], value)
        elif key in out:
            raise ValueError(f"parameter {key!r} is in both trees")
        else:
            out[key] = value
    return out


def decay_mask(params: dict) -> dict:
    """True where weight decay applies: every leaf except biases and norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: flat_path(kp).rsplit("/", 1)[-1] not in NO_DECAY_LEAVES, params)


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


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
    """Clip-by-global-norm then AdamW (decay masked off biases and norms).

    Gradient accumulation happens inside the train step (a scan over micro-batches), so the
    optimizer sees one already-averaged gradient per step.
    """
    schedule = make_schedule(optim_config, total_steps)
    parts = []
    if optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(optax.adamw(
        schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
        weight_decay=optim_config.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# ----- loss -----

def chunked_cross_entropy(logits_fn, hidden, targets, chunk_size: int):
    """Sum of token losses and number of target tokens, the LM head applied chunk by chunk.

    hidden [b, s, d], targets int [b, s] (IGNORE_INDEX = no loss). The [b, s, vocab] float32
    logits never exist at once: each chunk is rematerialised in the backward pass.
    """
    batch, seq, dim = hidden.shape
    chunk = seq if chunk_size <= 0 or chunk_size >= seq else chunk_size
    pad = (-seq) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    num_chunks = (seq + pad) // chunk
    hidden = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    targets = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def piece(h, t):
        logits = logits_fn(h)  # float32 [b, chunk, vocab]
        valid = t != IGNORE_INDEX
        target_logit = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], -1)[..., 0]
        losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
        return jnp.sum(jnp.where(valid, losses, 0.0))

    def body(total, xs):
        return total + piece(*xs), None

    if num_chunks == 1:
        loss_sum = piece(hidden[0], targets[0])
    else:
        loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets))
    return loss_sum


def lm_head_capacity(seq: int, target_fraction: float) -> int:
    """Positions per row the LM head runs on when the targets fit: ceil(fraction * seq),
    rounded up to a multiple of 8; `seq` (all of them) when target_fraction <= 0."""
    if target_fraction <= 0:
        return seq
    return min(seq, -(-math.ceil(target_fraction * seq) // 8) * 8)


def target_loss_sum(logits_fn, hidden, targets, *, chunk_size: int, target_fraction: float):
    """Sum of token losses, the LM head run only where there is a target when that is cheaper.

    hidden [b, s, d], targets int [b, s]. When every row has at most
    ceil(target_fraction * s) target tokens (image tokens and prompts never have one), those
    positions are gathered first ([b, capacity, d]) and the LM head, the heaviest matmul of a
    small model, skips the rest; otherwise (or with target_fraction <= 0) it runs on all s.
    Both branches give the same sum; `lax.cond` runs one. Rows stay whole, so a batch-sharded
    `hidden` is gathered without communication.
    """
    seq = hidden.shape[1]
    capacity = lm_head_capacity(seq, target_fraction)
    if capacity >= seq:
        return chunked_cross_entropy(logits_fn, hidden, targets, chunk_size)
    valid = targets != IGNORE_INDEX
    # Target positions first, in order (a stable sort of "not a target"); the tail beyond a
    # row's count holds non-targets, whose targets are IGNORE_INDEX, so nothing is masked.
    order = jnp.argsort(jnp.logical_not(valid), axis=-1, stable=True)[:, :capacity]
    picked_hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    picked_targets = jnp.take_along_axis(targets, order, axis=1)
    fits = jnp.all(jnp.sum(valid, axis=-1) <= capacity)
    return jax.lax.cond(
        fits,
        lambda: chunked_cross_entropy(logits_fn, picked_hidden, picked_targets, chunk_size),
        lambda: chunked_cross_entropy(logits_fn, hidden, targets, chunk_size))


def shifted_targets(labels):
    """labels [..., s] (aligned with input_ids) -> next-token targets [..., s]."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)
