"""Building blocks shared by the vision tower, projector and decoder.

Parameters live in `param_dtype`; matmuls take inputs in the compute `dtype` and always
accumulate in float32 (`preferred_element_type`). On TPU/GPU that is what the MXU/tensor
cores do anyway; on XLA:CPU it is the difference between ~100 and ~600 GFLOP/s in bf16.
`matmul` keeps the backward's matmuls in the compute dtype too (see there).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import accumulate

Array = jax.Array

default_kernel_init = nnx.initializers.normal(stddev=0.02)


def matmul(spec: str, a: Array, b: Array) -> Array:
    """jnp.einsum(spec, a, b) with float32 results, whose backward also runs in a's dtype.

    spec: "A,B->C" with one letter per dim (no "..."), every letter of A in B or C and every
    letter of B in A or C (what matmuls and attention use). a and b are in the compute dtype.
    Differentiated as a plain einsum with float32 output, the cotangent arrives in float32
    and both transposed matmuls (d_a = g . b, d_b = a . g) run on float32 operands: 4-5x
    slower than bf16 on AMX CPUs, multi-pass on TPU, and [tokens, width] float32 buffers in
    between. Here the cotangent is rounded to the compute dtype first (as torch.autocast and
    flash-attention do) and the transposed matmuls take bf16 operands with float32
    accumulation (a bf16-output dot would be run in float32 by XLA:CPU). Identical to
    jnp.einsum when a is float32.
    """
    if a.dtype == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _low_precision_matmul(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_matmul(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(spec, a, b):
    return _low_precision_matmul(spec, a, b), (a, b)


def _low_precision_matmul_bwd(spec, residuals, g):
    a, b = residuals
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    g = g.astype(a.dtype)
    grad_a = jnp.einsum(f"{out},{rhs}->{lhs}", g, b, preferred_element_type=jnp.float32)
    grad_b = jnp.einsum(f"{lhs},{out}->{rhs}", a, g, preferred_element_type=jnp.float32)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [in_features, out_features] (transposed torch Linear)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        kernel_init: Callable = default_kernel_init,
    ):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """x: [..., in_features] -> [..., out_features] in the compute dtype."""
        lead = "abcdefgh"[:x.ndim - 1]  # matmul's specs spell every dim (no "...")
        y = matmul(f"{lead}i,io->{lead}o", x.astype(self.dtype),
                   self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (transformers' order)."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * self.scale[...].astype(self.dtype)).astype(self.dtype)


def quick_gelu(x: Array) -> Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x: Array) -> Array:
    """SigLIP's activation: GELU, tanh approximation (torch's gelu(approximate="tanh"))."""
    return jax.nn.gelu(x, approximate=True)


def remat_policy(name: str):
    """Maps the config's remat_policy to a jax.checkpoint policy; None means no remat."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    return getattr(jax.checkpoint_policies, name)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    """Creates `num_layers` copies of a layer whose parameters carry a leading [layers] axis.

    One layout for both the scanned and the unrolled forward pass, so checkpoints do not
    depend on the `scan_layers` switch.
    """
    keys = jax.random.split(rngs.params(), num_layers)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return make_layer(nnx.Rngs(params=key))

    return create(keys)


def run_stacked(layers: nnx.Module, carry, body: Callable, *, scan: bool, policy_name: str,
                xs=None, start: int = 0, stop: int | None = None):
    """Runs layers[start:stop] over `carry`, each as `body(layer, carry, x) -> (carry, y)`.

    `xs` is an optional pytree with a leading [layers] axis (e.g. a KV cache) fed to each
    layer; the stacked `y`s are returned. With `scan=True` this is one `lax.scan` (compiles
    once, whatever the depth); otherwise a Python loop over the same stacked parameters.
    """
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    stop = num_layers if stop is None else stop
    if start or stop != num_layers:
        state = jax.tree.map(lambda p: p[start:stop], state)

    def step(carry, layer_state_and_x):
        layer_state, x = layer_state_and_x
        return body(nnx.merge(graphdef, layer_state), carry, x)

    registry = accumulate.active()
    if registry is not None and policy_name == "full":
        # The train step accumulates micro-batches: add each layer's weight gradient into the
        # running sum inside the backward (models/accumulate.py) instead of materialising the
        # micro-batch's [layers, ...] gradient beside the sum. Full remat only: its backward
        # recomputes every layer, which is what that path does.
        leaves, treedef = jax.tree.flatten(state)
        sums = [registry.claim(leaf) for leaf in leaves]
        if any(s is not None for s in sums):
            layer_fn = lambda c, layer_leaves, x: step(
                c, (jax.tree.unflatten(treedef, layer_leaves), x))
            return accumulate.stacked_with_sinks(layer_fn, carry, xs, leaves, sums, scan=scan)

    policy = remat_policy(policy_name)
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=not scan)
    if scan:
        return jax.lax.scan(step, carry, (state, xs))
    ys = []
    for i in range(stop - start):
        layer_in = jax.tree.map(lambda p: p[i], (state, xs))
        carry, y = step(carry, layer_in)
        ys.append(y)
    stacked_ys = None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
    return carry, stacked_ys
