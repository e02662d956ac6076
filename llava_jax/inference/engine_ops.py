"""The engine's jitted programs on the slot cache (see engine.py for the layout).

  prefill_insert  prefill a group of left-aligned prompts, sample their first tokens, copy
                  their cache rows into free slots so that each block ends at column t
  decode          one step of every slot at column t (the model's cached forward)
  shift           move every slot's columns by delta (free columns on the left)
  layer_states    the decoder's per-layer weights (CPU decoding, as `generate` does)

Sampling goes row by row through `generate`'s sampler on a batch of one, with each row's own
key folded with its own step: a request's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.inference.generation import _prefill, _sample


def sample_rows(logits, key_data, steps, temperature, top_p, *, sampling: bool,
                use_top_p: bool):
    """Next ids int32 [b] from logits [b, V], each row with its own settings.

    Greedy rows (temperature 0) take the argmax; sampled rows draw with their own key folded
    with their own step, through `generate`'s sampler on a batch of one, so a request's
    tokens do not depend on which other requests share the batch.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sampling:
        return greedy

    def one(data, step, row, temp, p):
        key = jax.random.fold_in(jax.random.wrap_key_data(data), step)
        plain = _sample(row[None], key, temp, p, greedy=False, top_k=0, use_top_p=False)[0]
        if not use_top_p:
            return plain
        nucleus = _sample(row[None], key, temp, p, greedy=False, top_k=0, use_top_p=True)[0]
        return jnp.where(p < 1, nucleus, plain)

    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.vmap(one)(key_data, steps, logits, safe_temperature, top_p)
    return jnp.where(temperature > 0, sampled, greedy)


def insert_rows(cache: dict, new: dict, mask, rows, start):
    """Copies prefill rows (stacked layout, [layers, k, kv_heads, L, hd]) into cache rows
    `rows` [k] at columns start..start+L; the rest of each such row becomes empty."""
    segments = cache["segment_ids"]
    width = segments.shape[1]
    layers = cache.get("layers")
    k, v = cache.get("k"), cache.get("v")
    for j in range(rows.shape[0]):
        row = rows[j]
        line = jax.lax.dynamic_update_slice(jnp.zeros((1, width), jnp.int32),
                                            mask[j][None].astype(jnp.int32), (0, start))
        segments = jax.lax.dynamic_update_slice(segments, line, (row, 0))
        if layers is not None:
            layers = [{name: jax.lax.dynamic_update_slice(
                layer[name], new[name][i, j][None].astype(layer[name].dtype), (row, 0, start, 0))
                for name in ("k", "v")} for i, layer in enumerate(layers)]
        else:
            k = jax.lax.dynamic_update_slice(k, new["k"][:, j][:, None].astype(k.dtype),
                                             (0, row, 0, start, 0))
            v = jax.lax.dynamic_update_slice(v, new["v"][:, j][:, None].astype(v.dtype),
                                             (0, row, 0, start, 0))
    if layers is not None:
        return {"layers": layers, "segment_ids": segments}
    return {"k": k, "v": v, "segment_ids": segments}


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "use_top_p"),
                   donate_argnames=("cache",))
def prefill_insert(graphdef, state, ids, mask, pixel_values, image_mask, rows, start,
                        key_data, temperature, top_p, cache, *, sampling, use_top_p):
    """Prefill k left-aligned prompts [k, L], sample their first tokens [k] and copy their
    cache rows into `cache` rows `rows` at column `start`."""
    model = nnx.merge(graphdef, state)
    # The serving engine takes flat (one-tile) images only: no tiled layout.
    logits, new = _prefill(model, ids, mask, pixel_values, image_mask, (None, None),
                           ids.shape[1])
    steps = jnp.zeros(ids.shape[0], jnp.int32)
    tokens = sample_rows(logits, key_data, steps, temperature, top_p, sampling=sampling,
                          use_top_p=use_top_p)
    return tokens, insert_rows(cache, new, mask, rows, start)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer_graphdef", "sampling",
                                             "use_top_p"), donate_argnames=("cache",))
def decode(graphdef, state, layer_graphdef, layer_states, tokens, positions, active,
                column, key_data, steps, temperature, top_p, cache, *, sampling, use_top_p):
    """One decode step for every slot: tokens [B] written at `column`; next tokens [B]."""
    model = nnx.merge(graphdef, state)
    layers = (None if layer_states is None
              else [nnx.merge(layer_graphdef, layer_state) for layer_state in layer_states])
    logits, cache = model(tokens[:, None], segment_ids=active[:, None].astype(jnp.int32),
                          positions=positions[:, None], cache=cache, cache_index=column,
                          layers=layers)
    return sample_rows(logits[:, 0], key_data, steps, temperature, top_p, sampling=sampling,
                        use_top_p=use_top_p), cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def shift(cache: dict, delta):
    """Moves every row's columns by `delta` (negative: left); vacated columns become empty."""
    segments = cache["segment_ids"]
    width = segments.shape[1]
    columns = jnp.arange(width)
    keep = (columns - delta >= 0) & (columns - delta < width)
    out = {"segment_ids": jnp.where(keep[None], jnp.roll(segments, delta, axis=1), 0)}
    roll = functools.partial(jnp.roll, shift=delta, axis=-2)
    if "layers" in cache:
        out["layers"] = [{name: roll(layer[name]) for name in ("k", "v")}
                         for layer in cache["layers"]]
    else:
        out["k"], out["v"] = roll(cache["k"]), roll(cache["v"])
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def layer_states(graphdef, state):
    model = nnx.merge(graphdef, state)
    return [nnx.state(layer) for layer in model.language_model.unstack_layers()]
