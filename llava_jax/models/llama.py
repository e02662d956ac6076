"""LLaMA-style decoder with packing masks and a KV cache: one module whose config switches
cover transformers' `LlamaForCausalLM` (Vicuna, LLaMA-2, Llama-3/3.1 with `llama3`, `linear`
or `dynamic` rope scaling), `MistralForCausalLM` (sliding-window attention) and
`Qwen2ForCausalLM` (q/k/v biases, tied embeddings).

Attention masking is expressed with two per-token integer arrays:
  segment_ids [batch, seq]: tokens attend only within their own segment; 0 marks padding
    (a padding mask is segment ids of 0/1; packed rows use 1..k).
  positions   [batch, seq]: rotary positions, restarting at 0 for every packed sample.
They reach the attention kernels as an `AttentionMask` (segment ids + slots, no [q, kv]
matrix); `LlavaConfig.attention` picks the kernel (models/attention.py).
The KV cache is a plain pytree (`init_cache`), updated functionally, so prefill and decode
are ordinary jitted functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.attention import AttentionMask, dot_product_attention
from llava_jax.models.config import TextConfig
from llava_jax.models.layers import Dense, RMSNorm, matmul, run_stacked, stacked
from llava_jax.models.partitioning import (BATCH, HEAD_DIM, HEADS, KV_HEADS, LENGTH, MLP,
                                           RESIDUAL, VOCAB, constrain)

Array = jax.Array


def rope_inv_freq(config: TextConfig, positions: Array) -> Array:
    """Rotary inverse frequencies [head_dim / 2] float32, as transformers' rope init functions
    compute them for config.rope_scaling_type (positions [b, s]: only 'dynamic' reads them)."""
    head_dim, theta = config.resolved_head_dim, config.rope_theta
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    factor = config.rope_scaling_factor
    if factor is None:
        return inv_freq
    kind = config.rope_scaling_type
    if kind == "linear":  # positions are divided by the factor
        return inv_freq / factor
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        context = (config.rope_original_max_position_embeddings
                   or config.max_position_embeddings)
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < context / high) & ~(wavelength > context / low)
        return jnp.where(medium, smoothed, scaled)
    if kind == "dynamic":
        # NTK-aware: past max_position_embeddings the base grows with the length the call
        # reaches (max position + 1 over the batch, as transformers' dynamic update); below
        # it the plain frequencies, exactly.
        limit = config.max_position_embeddings
        length = (jnp.max(positions) + 1).astype(jnp.float32)
        base = theta * ((factor * jnp.maximum(length, limit) / limit) - (factor - 1)) ** (
            head_dim / (head_dim - 2))
        return jnp.where(length > limit, 1.0 / (base ** exponent), inv_freq)
    raise ValueError(f"text.rope_scaling_type={kind!r} is not supported.")


def rotary_tables(positions: Array, config: TextConfig) -> tuple[Array, Array]:
    """positions [batch, seq] -> (cos, sin) [batch, seq, head_dim], float32 (HF layout)."""
    inv_freq = rope_inv_freq(config, positions)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [batch, seq, heads, head_dim]; rotates the two halves (transformers' rotate_half)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query attention with rotary embeddings; `attention` names the kernel
    (models/attention.py: 'auto', 'xla', 'chunked', 'cudnn', 'splash')."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
                 attention: str = "auto"):
        head_dim = config.resolved_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_bias = config.attention_bias or config.qkv_bias  # Qwen2: q/k/v only
        self.q_proj = Dense(config.hidden_size, config.num_heads * head_dim, use_bias=qkv_bias, **kw)
        self.k_proj = Dense(config.hidden_size, config.num_kv_heads * head_dim, use_bias=qkv_bias,
                            **kw)
        self.v_proj = Dense(config.hidden_size, config.num_kv_heads * head_dim, use_bias=qkv_bias,
                            **kw)
        self.o_proj = Dense(config.num_heads * head_dim, config.hidden_size,
                            use_bias=config.attention_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads, config.num_kv_heads, head_dim)
        self.dtype = dtype
        self.attention = attention

    def __call__(self, x: Array, cos: Array, sin: Array, mask: AttentionMask, cache=None,
                 cache_index=None):
        """x [b, s, d]; mask over s queries x kv_len keys (kv_len = s, or the cache's
        max_len); cache {'k','v': [b, kv_heads, max_len, hd]}.

        Returns (out [b, s, d], new cache or None). With a cache the new keys/values are
        written at `cache_index` and attention runs over the whole (masked) cache. Keys and
        values are head-major ([b, kv_heads, slots, hd]), the layout the attention dots read,
        so decoding never transposes the cache.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, s, hd]
        if cache is not None:
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        # Megatron layout: each tensor shard holds whole heads (q/k/v_proj column-parallel),
        # so attention itself needs no communication.
        q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
        k = constrain(k, (BATCH, KV_HEADS, LENGTH, HEAD_DIM))
        v = constrain(v, (BATCH, KV_HEADS, LENGTH, HEAD_DIM))
        out = dot_product_attention(q, k, v, mask, self.attention)  # [b, s, heads, hd]
        out = constrain(out.astype(self.dtype), (BATCH, LENGTH, HEADS, HEAD_DIM))
        out = out.reshape(batch, seq, self.num_heads * self.head_dim)
        # o_proj is row-parallel: its partial sums meet in one all-reduce over 'tensor'.
        return constrain(self.o_proj(out), RESIDUAL), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = Dense(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = Dense(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        """x [b, s, d] -> [b, s, d]; the [b, s, intermediate] hidden is split over 'tensor'."""
        gate = constrain(self.gate_proj(x), (BATCH, LENGTH, MLP))
        up = constrain(self.up_proj(x), (BATCH, LENGTH, MLP))
        return constrain(self.down_proj(jax.nn.silu(gate) * up), RESIDUAL)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
                 attention: str = "auto"):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                        attention=attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = constrain(x + attn, RESIDUAL)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL), cache


class LlamaModel(nnx.Module):
    """Token embeddings -> decoder layers -> final norm -> LM head."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, scan_layers: bool,
                 remat_policy: str, rngs: nnx.Rngs, attention: str = "auto"):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(stddev=0.02))
        self.layers = stacked(
            lambda r: LlamaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                        attention=attention),
            config.num_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs))
        self.config = config
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.dtype = dtype

    def embed(self, input_ids: Array) -> Array:
        """[b, s] int -> [b, s, d] in the compute dtype."""
        return constrain(self.embed_tokens(input_ids).astype(self.dtype), RESIDUAL)

    def logits(self, hidden: Array) -> Array:
        """[b, s, d] final-normed hidden -> float32 logits [b, s, vocab].

        Rows stay split over the batch axes and the vocabulary over 'tensor' (the LM head is
        column-parallel): left alone, XLA may instead contract over the fsdp-sharded embed
        dim and all-reduce whole-batch float32 logits.
        """
        hidden = constrain(hidden, RESIDUAL)
        if self.lm_head is None:
            table = self.embed_tokens.embedding[...].astype(self.dtype)
            logits = matmul("bsd,vd->bsv", hidden, table)
        else:
            kernel = self.lm_head.kernel[...].astype(self.dtype)
            logits = matmul("bsd,dv->bsv", hidden, kernel)
        return constrain(logits, (BATCH, LENGTH, VOCAB))

    def __call__(self, embeds: Array, positions: Array, segment_ids: Array, *, cache=None,
                 cache_index=None, return_hidden: bool = False, layers=None):
        """Runs the decoder on input embeddings.

        Args:
          embeds: [b, s, d] token (and image) embeddings.
          positions: [b, s] rotary positions.
          segment_ids: [b, s] ints; 0 = padding, equal ids attend to each other (causally).
          cache: None, or `init_cache(...)` output; then tokens go at slots
            cache_index .. cache_index + s and attend over all earlier cached slots.
          return_hidden: return the final-normed hidden state [b, s, d] instead of logits.
          layers: None runs the stacked layers (scanned or looped, as configured); a list from
            `unstack_layers()` runs those per-layer modules instead, with a cache in the
            per-layer layout (`unstack_cache`). Both compute the same thing; see
            `unstack_layers` for why decoding on CPU wants the second.
        Returns:
          logits float32 [b, s, vocab] (or hidden), and the updated cache when one was given.
        """
        config = self.config
        cos, sin = rotary_tables(positions, config)
        if cache is None:
            mask = AttentionMask.for_sequence(segment_ids, config.sliding_window)
        else:
            kv_segments = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))
            mask = AttentionMask.for_cache(segment_ids, kv_segments, cache_index,
                                           config.sliding_window)

        if layers is None:
            def body(layer, h, layer_cache):
                return layer(h, cos, sin, mask, layer_cache, cache_index)

            kv_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
            hidden, new_cache = run_stacked(self.layers, embeds, body, scan=self.scan_layers,
                                            policy_name=self.remat_policy, xs=kv_cache)
        else:
            hidden, layer_caches = embeds, []
            for index, layer in enumerate(layers):
                layer_cache = None if cache is None else cache["layers"][index]
                hidden, layer_cache = layer(hidden, cos, sin, mask, layer_cache, cache_index)
                layer_caches.append(layer_cache)
            new_cache = {"layers": layer_caches}
        hidden = constrain(self.norm(hidden), RESIDUAL)  # also the loss's input
        out = hidden if return_hidden else self.logits(hidden)
        if cache is None:
            return out
        return out, {**new_cache, "segment_ids": kv_segments}

    def unstack_layers(self) -> list[LlamaDecoderLayer]:
        """The decoder layers as `num_layers` separate modules, each holding its own slice.

        The model keeps layer weights stacked [layers, ...] and slices layer i inside its
        forward. On CPU, XLA materialises that slice (a copy of the layer's weights) every
        time the forward runs, which dominates a decode step. Slicing once, before a decode
        loop, and passing the result as `layers=` removes the copies at the cost of one
        temporary copy of the decoder weights.
        """
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], state))
                for i in range(self.config.num_layers)]

    @staticmethod
    def unstack_cache(cache: dict) -> dict:
        """An `init_cache` layout cache in the layout `layers=` takes:
        {"layers": [{"k", "v": [b, kv_heads, slots, head_dim]}, ...], "segment_ids"}."""
        layers = [{"k": k, "v": v} for k, v in zip(cache["k"], cache["v"])]
        return {"layers": layers, "segment_ids": cache["segment_ids"]}

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache: k, v [layers, b, kv_heads, max_length, head_dim]; segment_ids [b, max_length]."""
        config = self.config
        shape = (config.num_layers, batch, config.num_kv_heads, max_length,
                 config.resolved_head_dim)
        dtype = dtype or self.dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "segment_ids": jnp.zeros((batch, max_length), jnp.int32)}
