"""The train step: one pure function of the state and a batch, jitted by `state.build_setup`.

    batch [accum, rows, ...] --loop over micro-batches--> summed grads / #target tokens
          --> clip + AdamW --> new trainable params, and a flag: is everything finite?
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax import sharding, tree
from llava_jax.data.tokenize import IGNORE_INDEX
from llava_jax.models import accumulate, lora, partitioning
from llava_jax.training.loss import shifted_targets, target_loss_sum


def make_train_step(graphdef, tx, *, loss_chunk_size: int, lm_head_target_fraction: float = 0.0,
                    activation_rules=sharding.DEFAULT_ACTIVATION_RULES,
                    dropout_seed: int | None = None, accumulate_in_backward: bool = True):
    """(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

    batch leaves are [accum, rows, ...]; pixel_values/image_mask are absent for text-only
    batches (no dummy images through CLIP); tiled models' batches add image_feature_index /
    image_feature_weight (data/batching.py). The loss is the mean over all target tokens of
    the step, so it does not depend on how the rows are split into micro-batches or devices.
    activation_rules: (logical activation axis, mesh axes) pairs the model's sharding
    constraints follow when the step is traced under `jax.set_mesh` (models/partitioning.py);
    () or None = no constraints. They change placement and collectives, never the numbers.
    dropout_seed: LoRA dropout on (models/lora.py), masks from key(seed) folded with the
    optimizer's step count (so a resumed run draws the same masks) and the micro-batch.
    accumulate_in_backward: with several micro-batches and full remat, the stacked layers add
    their weight gradients into the running sum inside the backward (models/accumulate.py)
    instead of materialising each micro-batch's gradient tree beside it; same numbers, one
    float32 gradient tree less at the peak. False: the plain `sum + jax.grad(...)`.
    """

    def micro_loss(trainable, frozen, micro, num_targets, dropout_key):
        model = nnx.merge(graphdef, tree.merge(trainable, frozen))
        with lora.dropout_key(dropout_key):
            return _loss(model, micro, num_targets)

    def _loss(model, micro, num_targets):
        hidden = model(micro["input_ids"], micro.get("pixel_values"),
                       segment_ids=micro["segment_ids"], positions=micro["positions"],
                       image_mask=micro.get("image_mask"),
                       image_feature_index=micro.get("image_feature_index"),
                       image_feature_weight=micro.get("image_feature_weight"),
                       return_hidden=True)
        targets = shifted_targets(micro["labels"])
        loss_sum = target_loss_sum(model.language_model.logits, hidden, targets,
                                   chunk_size=loss_chunk_size,
                                   target_fraction=lm_head_target_fraction)
        return loss_sum / num_targets

    grad_fn = jax.value_and_grad(micro_loss)

    def sinking_loss(registry, trainable, frozen, micro, num_targets, dropout_key, sums):
        # `sums` is differentiated too: the stacked layers add their weight gradients into it
        # inside the backward (models/accumulate.py), so d loss / d sums comes back as the new
        # running sum for every leaf the layers claimed.
        registry.register(trainable, sums)
        with accumulate.sinks(registry):
            return micro_loss(trainable, frozen, micro, num_targets, dropout_key)

    sinking_grad_fn = jax.value_and_grad(sinking_loss, argnums=(1, 6))

    def train_step(trainable, frozen, opt_state, batch):
        # Installed inside the traced function: the rules belong to this jitted step, so no
        # other trace (generation, a step built with other rules) can pick them up.
        with partitioning.axis_rules(activation_rules):
            return constrained_step(trainable, frozen, opt_state, batch)

    def constrained_step(trainable, frozen, opt_state, batch):
        num_targets = jnp.maximum(
            jnp.sum(shifted_targets(batch["labels"]) != IGNORE_INDEX), 1).astype(jnp.float32)

        step_key = None
        if dropout_seed is not None:
            count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
            step_key = jax.random.fold_in(jax.random.key(dropout_seed), count)

        def micro_grads(index):  # float32 sums, whatever the param dtype
            micro = jax.tree.map(lambda x: x[index], batch)
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            loss, grads = grad_fn(trainable, frozen, micro, num_targets, key)
            return jax.tree.map(lambda x: x.astype(jnp.float32), (loss, grads))

        def accumulate_micro(index, total):
            """(loss sum, gradient sums) + micro-batch `index`'s, the sums updated in place."""
            loss_total, sums = total
            micro = jax.tree.map(lambda x: x[index], batch)
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            registry = accumulate.Sinks()
            loss, (grads, sunk) = sinking_grad_fn(registry, trainable, frozen, micro,
                                                  num_targets, key, sums)
            # Claimed leaves: the sum came back through the backward and their own gradient
            # is zero (added anyway, in case a leaf is also used outside the layers; XLA drops
            # an added zero). The rest (embeddings, projector, unscanned use): sum + grad.
            flat_sums, treedef = jax.tree.flatten(sums)
            new_sums = [
                (through if claimed else total_) + grad.astype(jnp.float32)
                for total_, through, grad, claimed in zip(
                    flat_sums, jax.tree.leaves(sunk), jax.tree.leaves(grads), registry.claimed)]
            return (loss_total + loss.astype(jnp.float32),
                    jax.tree.unflatten(treedef, new_sums))

        accum_steps = jax.tree.leaves(batch)[0].shape[0]
        if accum_steps == 1:  # no loop traced
            loss, grads = micro_grads(0)
        else:
            # Every micro-batch inside the loop, the sum starting from zeros: one copy of the
            # forward / backward in the program. Starting from micro-batch 0 outside the loop
            # put a second copy beside the loop's, and their temporaries do not share memory:
            # 7B stage 2 on 8 devices at 8 rows x 2 micro-batches: 37.8 -> 29.2 GiB per device.
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                 (jnp.zeros(()), trainable))
            accumulate_fn = (accumulate_micro if accumulate_in_backward else
                             lambda i, total: jax.tree.map(jnp.add, total, micro_grads(i)))
            loss, grads = jax.lax.fori_loop(0, accum_steps, accumulate_fn, zeros)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # The host stops the run when it sees the flag, before it saves or logs this step, so
        # no checkpoint ever holds a non-finite step. The new params too: finite gradients
        # times a huge learning rate still overflow. The step is not undone here: a select
        # over params and both Adam moments was one more full pass over the optimizer state
        # each step (bench train's bf16 step on CPU: 9% faster without).
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(new_trainable)))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "target_tokens": num_targets}
        return new_trainable, new_opt_state, metrics

    return train_step
