"""The training loss: next-token cross-entropy over target tokens, LM head in chunks.

Only positions with a target (assistant answers; never image tokens or prompts) carry loss.
`target_loss_sum` runs the LM head, the heaviest matmul of a small model, on those positions
alone when they fit a fixed capacity, and `chunked_cross_entropy` never builds the whole
[batch, seq, vocab] float32 logits at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llava_jax.data.tokenize import IGNORE_INDEX
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
