"""The decoder's attention kernels, chosen by `LlavaConfig.attention` (ATTENTION_IMPLEMENTATIONS).

Every implementation takes the same operands:
  q    [b, q_len, heads, hd]       rotary already applied, in the compute dtype
  k, v [b, kv_heads, kv_len, hd]   head-major: the KV cache's layout (GQA: heads % kv_heads == 0)
  mask `AttentionMask`: per-token segment ids and slots, never a [q, kv] matrix
and return [b, q_len, heads, hd] in q's dtype. Query i may attend key j when
  q_slot[i] >= kv_slot[j] (causal), q_segment[i] == kv_segment[j], kv_segment[j] != 0,
  and, with a sliding window w (Mistral), q_slot[i] - kv_slot[j] < w.
Slots are token indices (cache columns), as transformers' sliding-window mask counts them;
within a segment they differ from rotary positions by a constant, so the window is the
same in packed rows, left-padded prompts and the KV cache.
A query of segment 0 (padding) attends to nothing; `xla` (the reference) then gives it the
mean of all values, and `chunked` reproduces that exactly. `cudnn` and `splash` give such
rows other finite values: padding rows never reach a loss or a sampled token.

  xla      einsum -> where -> softmax -> einsum; stores the [q, kv] probabilities for backward.
  chunked  blocks of queries x keys with an online softmax (running max / sum), skipping
           blocks no query may see (the causal upper triangle, other packed segments, empty
           cache slots); a custom VJP recomputes the blocks, so backward stores only q, k,
           v, the output and one log-sum-exp per query. Plain JAX: runs everywhere.
  cudnn    jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPUs, bf16 / fp16.
  splash   the Pallas TPU splash-attention kernel (causal + segment ids, GQA), in shard_map
           over the batch / heads axes of the mesh in context (jax.set_mesh). XLA cannot
           partition a Mosaic kernel, so without a mesh it runs only on a one-chip process.
  auto     splash when compiled for TPU, cudnn on NVIDIA GPUs, on CPU xla below
           SHORT_QUERIES queries and chunked from there (BUILD_NOTES.md: measured).

cudnn and splash fall back (xla below SHORT_QUERIES queries, else chunked), with a logged
reason, for calls they cannot express, e.g. decode steps against a KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import PartitionSpec

Array = jax.Array
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows stay NaN-free
BLOCK = 256  # chunked: queries and keys per block (BUILD_NOTES.md: CPU timings by block size)
# Below this many queries the [q, kv] matrix is small and xla is as fast or faster (CPU
# measurement, BUILD_NOTES.md; a decode step has 1 query): auto on CPU and the fallbacks of
# cudnn / splash use xla there, chunked from there up.
SHORT_QUERIES = 512
SPLASH_BLOCKS = (512, 256, 128)  # splash tile sizes tried, largest dividing the length first
# Mesh axes (llava_jax.sharding.MESH_AXES; models/ imports nothing outside itself).
BATCH_AXES, HEADS_AXIS = ("data", "fsdp"), "tensor"
_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    """Logs each distinct message once per process: choices are made while tracing."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.info("%s", message)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["self_attention", "window"],
                   data_fields=["q_segments", "kv_segments", "q_slots", "kv_slots"])
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Who attends to whom, per token. All fields int32 [b, q_len] / [b, kv_len].

    self_attention (static): queries and keys are the same tokens, slot = index (no cache),
    so causality is the plain lower triangle, which the library kernels express natively.
    window (static): None, or the sliding window w: a query sees the w latest slots up to
    and including its own.
    """

    q_segments: Array
    kv_segments: Array
    q_slots: Array
    kv_slots: Array
    self_attention: bool
    window: int | None = None

    @classmethod
    def for_sequence(cls, segment_ids: Array, window: int | None = None) -> "AttentionMask":
        """Causal self-attention within segments of segment_ids [b, s] (0 = padding)."""
        segments = segment_ids.astype(jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(segments.shape[1], dtype=jnp.int32), segments.shape)
        return cls(segments, segments, slots, slots, True, window)

    @classmethod
    def for_cache(cls, segment_ids: Array, kv_segments: Array, cache_index,
                  window: int | None = None) -> "AttentionMask":
        """Queries segment_ids [b, s] at slots cache_index.. against a whole cache whose
        slots hold kv_segments [b, max_len] (0 = empty)."""
        batch, seq = segment_ids.shape
        q_slots = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)) + cache_index
        kv_slots = jnp.broadcast_to(jnp.arange(kv_segments.shape[1], dtype=jnp.int32),
                                    kv_segments.shape)
        return cls(segment_ids.astype(jnp.int32), kv_segments.astype(jnp.int32), q_slots,
                   kv_slots, False, window)

    def dense(self) -> Array:
        """Boolean [b, 1, q_len, kv_len]: causal (by slot), same segment, key not padding,
        within the window."""
        return _allowed(self.q_segments, self.kv_segments, self.q_slots, self.kv_slots,
                        self.window)[:, None]


def _allowed(q_segments, kv_segments, q_slots, kv_slots, window=None) -> Array:
    """Boolean [b, q, kv] from [b, q] / [b, kv] ints (window: static int or None)."""
    distance = q_slots[:, :, None] - kv_slots[:, None, :]
    causal = distance >= 0
    if window is not None:
        causal = causal & (distance < window)
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return causal & same & (kv_segments != 0)[:, None, :]


# ----------------------------------------------------------------------------------------------
# Choosing


def select_implementation(requested: str, backend: str, q_length: int,
                          device_kind: str = "") -> str:
    """The implementation `requested` resolves to on a process whose default backend is
    `backend` ('cpu' | 'gpu' | 'tpu'), for q_length queries. Pure: testable anywhere."""
    if requested == "auto":
        if backend == "tpu":
            return "splash"
        if backend == "gpu" and "nvidia" in device_kind.lower():
            return "cudnn"
        return _fallback_name(q_length)
    if requested == "cudnn" and not (backend == "gpu" and "nvidia" in device_kind.lower()):
        raise ValueError(
            f"attention='cudnn' needs an NVIDIA GPU (cuDNN flash attention); this process's "
            f"backend is {backend!r}{f' ({device_kind})' if device_kind else ''}. Use "
            "attention='auto' (picks per backend) or 'chunked' (runs everywhere).")
    return requested


def _fallback_name(q_length: int) -> str:
    return "xla" if q_length < SHORT_QUERIES else "chunked"


def fallback_attention(q: Array, k: Array, v: Array, mask: AttentionMask) -> Array:
    """What runs where a library kernel cannot: xla for short queries, else chunked."""
    return _IMPLEMENTATIONS[_fallback_name(q.shape[1])](q, k, v, mask)


def dot_product_attention(q: Array, k: Array, v: Array, mask: AttentionMask,
                          implementation: str = "auto") -> Array:
    """Attention by the named implementation (module docstring: operands and semantics).

    Resolved while tracing, from the default backend; `auto` and `splash` off TPU stage
    splash for TPU with `lax.platform_dependent`, so an ahead-of-time compile for a TPU
    topology from a CPU host (memory_plan --topology) gets the TPU kernel.
    """
    backend = jax.default_backend()
    device_kind = getattr(jax.devices()[0], "device_kind", "")
    choice = select_implementation(implementation, backend, q.shape[1], device_kind)
    local = _fallback_name(q.shape[1]) if choice == "splash" and backend != "tpu" else choice
    # Attention against a KV cache is never splash (splash_attention falls back for it), so
    # there is no TPU branch to stage: tracing one would only log that fallback off TPU.
    staged = (backend != "tpu" and implementation in ("auto", "splash")
              and mask.self_attention)
    if implementation in ("auto", "splash") and local in ("xla", "chunked"):
        summary = f"xla below {SHORT_QUERIES} queries, chunked from there"
    else:
        summary = local
    _log_once(f"attention={implementation!r} on this {backend} process: {summary}"
              + ("; splash in programs compiled for TPU" if staged else ""))
    fn = _IMPLEMENTATIONS[local]
    if staged:
        return jax.lax.platform_dependent(q, k, v, mask, tpu=splash_attention, default=fn)
    return fn(q, k, v, mask)


# ----------------------------------------------------------------------------------------------
# xla: the reference


def xla_attention(q: Array, k: Array, v: Array, mask: AttentionMask) -> Array:
    """The plain formulation: materialises the [b, heads, q, kv] logits and probabilities."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    # Query head h * groups + g shares key/value head h.
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * head_dim**-0.5
    logits = jnp.where(mask.dense()[:, :, None], logits, MASK_VALUE)  # [b, 1, 1, q, k] broadcast
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("bhgqk,bhkd->bqhgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(batch, seq, heads, head_dim)


# ----------------------------------------------------------------------------------------------
# chunked: blockwise with an online softmax and a recomputing backward


def chunked_attention(q: Array, k: Array, v: Array, mask: AttentionMask,
                      block: int | None = None) -> Array:
    """Memory-efficient attention (FlashAttention-2's algorithm in lax.scan): temporaries
    are [b, heads, block_q, block_kv]; backward stores no [q, kv] matrix. block: queries
    and keys per block (default BLOCK; shorter sequences are one block)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    block = block or BLOCK
    block_q, block_kv = min(block, seq), min(block, kv_len)
    pad_q, pad_kv = -seq % block_q, -kv_len % block_kv
    # Padded queries are segment 0 (their rows are dropped); padded keys are segment 0,
    # which no query attends to.
    qg = jnp.pad(q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim),
                 ((0, 0), (0, pad_q), (0, 0), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_kv), (0, 0))) for x in (k, v))
    q_ints = [jnp.pad(x, ((0, 0), (0, pad_q))) for x in (mask.q_segments, mask.q_slots)]
    kv_ints = [jnp.pad(x, ((0, 0), (0, pad_kv))) for x in (mask.kv_segments, mask.kv_slots)]
    out = _flash(qg, k, v, *q_ints, *kv_ints, block_q, block_kv, mask.window)[:, :seq]
    # A query that may see no key (segment 0) gets the mean of all values, as in `xla`,
    # whose softmax over an all-MASK_VALUE row is uniform; ordinary autodiff handles its
    # gradient, the kernel's rows there get a zero cotangent.
    mean_v = jnp.mean(v[:, :, :kv_len].astype(jnp.float32), axis=2)  # [b, kv_heads, hd]
    padding = (mask.q_segments == 0)[:, :, None, None, None]
    out = jnp.where(padding, mean_v[:, None, :, None, :].astype(out.dtype), out)
    return out.reshape(batch, seq, heads, head_dim)


def _block(x: Array, axis: int, index, size: int) -> Array:
    """Block `index` of `size` along `axis`: a dynamic slice, so the scans read K / V (a
    whole KV cache when decoding) in place instead of copying them into a blocked layout."""
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis)


def _scores(qi, kj, q_seg, q_slot, kv_seg, kv_slot, window):
    """Masked, scaled logits [b, kv_heads, groups, bq, bkv] f32 and the mask [b, bq, bkv]."""
    allowed = _allowed(q_seg, kv_seg, q_slot, kv_slot, window)
    logits = jnp.einsum("bqhgd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32)
    logits = logits * qi.shape[-1] ** -0.5  # after the dot, exactly as xla does
    return jnp.where(allowed[:, None, None], logits, MASK_VALUE), allowed


def _flash_forward(q, k, v, q_seg, q_slot, kv_seg, kv_slot, block_q, block_kv, window):
    """q [b, sq, kvh, g, hd], k/v [b, kvh, skv, hd] (lengths multiples of the blocks) ->
    out [b, sq, kvh, g, hd] in q's dtype, log-sum-exp [nq, b, kvh, g, bq] f32."""
    num_kv = k.shape[2] // block_kv

    def query_block(i):
        qi, qs, ql = (_block(x, 1, i, block_q) for x in (q, q_seg, q_slot))
        batch, bq, kv_heads, groups, head_dim = qi.shape

        def key_block(carry, j):
            ks, kl = _block(kv_seg, 1, j, block_kv), _block(kv_slot, 1, j, block_kv)
            # Sliced before the cond, so the branch's operands are blocks, not all of K / V.
            kj, vj = _block(k, 2, j, block_kv), _block(v, 2, j, block_kv)

            def update(carry):
                acc, row_max, row_sum = carry
                logits, _ = _scores(qi, kj, qs, ql, ks, kl, window)
                new_max = jnp.maximum(row_max, logits.max(-1))
                correction = jnp.exp(row_max - new_max)
                p = jnp.exp(logits - new_max[..., None])
                row_sum = row_sum * correction + p.sum(-1)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bhgqk,bhkd->bhgqd", p.astype(vj.dtype), vj,
                    preferred_element_type=jnp.float32)
                return acc, new_max, row_sum

            # Skip blocks no query of this block may see (causal upper triangle, other
            # segments, empty cache slots, keys behind the sliding window).
            needed = jnp.any(_allowed(qs, ks, ql, kl, window))
            return jax.lax.cond(needed, update, lambda c: c, carry), None

        stats = (batch, kv_heads, groups, bq)
        init = (jnp.zeros(stats + (head_dim,), jnp.float32),
                jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32))
        (acc, row_max, row_sum), _ = jax.lax.scan(key_block, init, jnp.arange(num_kv))
        empty = row_sum == 0  # rows of a block that saw nothing at all (padding only)
        out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
        # +inf makes p = exp(logit - lse) = 0 for such rows in the backward pass.
        lse = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(q.shape[1] // block_q))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape), lse  # out was [nq, b, bq, kvh, g, hd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_seg, q_slot, kv_seg, kv_slot, block_q, block_kv, window):
    return _flash_forward(q, k, v, q_seg, q_slot, kv_seg, kv_slot, block_q, block_kv, window)[0]


def _flash_fwd(q, k, v, q_seg, q_slot, kv_seg, kv_slot, block_q, block_kv, window):
    out, lse = _flash_forward(q, k, v, q_seg, q_slot, kv_seg, kv_slot, block_q, block_kv,
                              window)
    return out, (q, k, v, q_seg, q_slot, kv_seg, kv_slot, out, lse)


def _flash_bwd(block_q, block_kv, window, residuals, d_out):
    """FlashAttention-2's backward: per query block, rescan the key blocks; dq accumulates
    in the inner carry, dk / dv (f32, full length) across both scans."""
    q, k, v, q_seg, q_slot, kv_seg, kv_slot, out, lse = residuals
    # D_i = sum_d dO * O: the softmax-Jacobian term, one scalar per query row.
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", d_out, out, preferred_element_type=jnp.float32)
    scale = q.shape[-1] ** -0.5

    def query_block(dkv, i):
        qi, doi, qs, ql = (_block(x, 1, i, block_q) for x in (q, d_out, q_seg, q_slot))
        lse_i, delta_i = lse[i], _block(delta, 3, i, block_q)

        def key_block(carry, j):
            ks, kl = _block(kv_seg, 1, j, block_kv), _block(kv_slot, 1, j, block_kv)

            def grads(carry):
                dq, dk, dv = carry
                kj, vj = _block(k, 2, j, block_kv), _block(v, 2, j, block_kv)
                logits, allowed = _scores(qi, kj, qs, ql, ks, kl, window)
                p = jnp.exp(logits - lse_i[..., None])
                dv_j = jnp.einsum("bhgqk,bqhgd->bhkd", p.astype(doi.dtype), doi,
                                  preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqhgd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
                # Masked logits are constants (where), as in xla: no gradient through them.
                ds = jnp.where(allowed[:, None, None], p * (dp - delta_i[..., None]), 0.0)
                ds = (ds * scale).astype(qi.dtype)
                # Contracted to [b, h, g, q, d], then transposed: XLA:CPU's DotThunk has no
                # bf16 x bf16 = f32 kernel for the dot that writes bqhgd directly (jax 0.10.2,
                # b=4, h=8, 256-query blocks: "Unsupported element type").
                dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kj,
                                     preferred_element_type=jnp.float32).transpose(0, 3, 1, 2, 4)
                dk_j = jnp.einsum("bhgqk,bqhgd->bhkd", ds, qi, preferred_element_type=jnp.float32)
                add = lambda full, part: jax.lax.dynamic_update_slice_in_dim(
                    full, _block(full, 2, j, block_kv) + part, j * block_kv, 2)
                return dq, add(dk, dk_j), add(dv, dv_j)

            needed = jnp.any(_allowed(qs, ks, ql, kl, window))
            return jax.lax.cond(needed, grads, lambda c: c, carry), None

        init = (jnp.zeros(qi.shape, jnp.float32), *dkv)
        (dq, dk, dv), _ = jax.lax.scan(key_block, init, jnp.arange(k.shape[2] // block_kv))
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(q.shape[1] // block_q))
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape).astype(q.dtype)  # dq was [nq, b, bq, ...]
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# cudnn: jax.nn.dot_product_attention on NVIDIA GPUs


def cudnn_attention(q: Array, k: Array, v: Array, mask: AttentionMask,
                    implementation: str = "cudnn") -> Array:
    """cuDNN flash attention. Segments, padding, cache slots and the sliding window go in as
    its boolean `mask` (cuDNN adds it as a bias); self-attention also sets is_causal so
    cuDNN skips the upper triangle. `implementation="xla"` runs the same argument mapping
    through jax's own XLA path (how it is tested on CPU)."""
    head_dim = q.shape[-1]
    reason = None
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        reason = f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 / float16)"
    elif head_dim % 8 or head_dim > 128:
        reason = f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most 128)"
    elif mask.self_attention and q.shape[1] % 2:
        reason = f"odd length {q.shape[1]} (cuDNN's masked training kernel needs even lengths)"
    if reason is not None and implementation == "cudnn":
        _log_once(f"attention: cudnn cannot take {reason}; using "
                  f"{_fallback_name(q.shape[1])} for these calls")
        return fallback_attention(q, k, v, mask)
    # jax.nn takes keys / values as [b, kv_len, kv_heads, hd].
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # A sliding window is in the dense mask only: cuDNN's own sliding_window_length is not
    # passed, since its combination with an explicit mask could not be checked on a GPU here.
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(),
                                        is_causal=mask.self_attention,
                                        implementation=implementation)


# ----------------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel


def splash_attention(q: Array, k: Array, v: Array, mask: AttentionMask,
                     interpret: bool = False) -> Array:
    """Splash attention: a static causal mask (a causal local mask with a sliding window:
    splash then also skips the tiles behind the window) and the segment ids, per batch row (vmap),
    inside shard_map when a mesh is in context. `interpret=True` runs the kernel in the
    Pallas interpreter (any backend, slowly: for tests)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    block = next((b for b in SPLASH_BLOCKS if seq % b == 0), None)
    mesh = jax.sharding.get_abstract_mesh()
    reason = None
    if not mask.self_attention:
        reason = "attention against a KV cache (its causal offset is not static)"
    elif block is None:
        reason = f"length {seq} (splash tiles need a multiple of {SPLASH_BLOCKS[-1]})"
    elif mesh.empty and not interpret and not (jax.default_backend() == "tpu"
                                               and jax.device_count() == 1):
        # XLA cannot partition a Mosaic kernel; without the mesh there is no shard_map.
        reason = "a program without a mesh in context (trace the step under jax.set_mesh)"
    if reason is not None:
        _log_once(f"attention: splash cannot take {reason}; using "
                  f"{_fallback_name(q.shape[1])} for these calls")
        return fallback_attention(q, k, v, mask)
    sizes = splash_lib.BlockSizes(*(block,) * 8)  # q / kv / compute tiles, forward and backward
    # The kernel does not scale: fold 1/sqrt(hd) into q. It takes [heads, seq, hd] per row.
    q = (q * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)
    segments = mask.q_segments
    if mask.window is None:
        head_mask = splash_lib.CausalMask((seq, seq))
    else:  # keys i - window + 1 .. i, as _allowed
        head_mask = splash_lib.LocalMask((seq, seq), window_size=(mask.window - 1, 0), offset=0)

    def rows(q, k, v, segments):
        # Built per call from the (local) shapes; the mask tables are small numpy arrays.
        kernel = splash_lib.make_splash_mha(
            splash_lib.MultiHeadMask([head_mask] * q.shape[1]),
            block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash_lib.SegmentIds(s, s))
        return jax.vmap(one)(q, k, v, segments)

    if not mesh.empty and mesh.size > 1:
        names = dict(zip(mesh.axis_names, mesh.axis_sizes))
        batch_axes = tuple(a for a in BATCH_AXES if a in names)
        if batch % math.prod(names[a] for a in batch_axes):
            batch_axes = ()
        tensor = names.get(HEADS_AXIS, 1)
        heads_axis = HEADS_AXIS if tensor > 1 and kv_heads % tensor == 0 else None
        head_spec = PartitionSpec(batch_axes or None, heads_axis, None, None)
        rows = jax.shard_map(rows, mesh=mesh, check_vma=False,
                             in_specs=(head_spec, head_spec, head_spec,
                                       PartitionSpec(batch_axes or None, None)),
                             out_specs=head_spec)
    out = rows(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)


_IMPLEMENTATIONS = {"xla": xla_attention, "chunked": chunked_attention,
                    "cudnn": cudnn_attention, "splash": splash_attention}
