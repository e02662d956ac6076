"""layers.matmul: an einsum with float32 results whose backward stays in the compute dtype."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.layers import matmul

SPECS = {  # spec: (lhs shape, rhs shape)
    "abi,io->abo": ((2, 6, 16), (16, 24)),  # Dense
    "bsd,vd->bsv": ((2, 6, 16), (40, 16)),  # tied LM head
}


def _loss(fn, spec, a, b, weights):
    return jnp.sum(fn(spec, a, b) * weights)


@pytest.mark.parametrize("spec", SPECS)
def test_float32_is_exactly_einsum(spec):
    shape_a, shape_b = SPECS[spec]
    rng = np.random.RandomState(0)
    a, b = (jnp.asarray(rng.randn(*s), jnp.float32) for s in (shape_a, shape_b))
    weights = jnp.asarray(rng.randn(*jnp.einsum(spec, a, b).shape), jnp.float32)
    einsum = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    ours = jax.grad(_loss, argnums=(2, 3))(matmul, spec, a, b, weights)
    plain = jax.grad(_loss, argnums=(2, 3))(einsum, spec, a, b, weights)
    for x, y in zip(ours, plain):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_gradients_are_the_float32_ones_of_a_rounded_cotangent(spec):
    shape_a, shape_b = SPECS[spec]
    rng = np.random.RandomState(1)
    a, b = (jnp.asarray(rng.randn(*s), jnp.bfloat16) for s in (shape_a, shape_b))
    out = matmul(spec, a, b)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, jnp.einsum(spec, a, b, preferred_element_type=jnp.float32))
    weights = jnp.asarray(rng.randn(*out.shape), jnp.float32)
    grad_a, grad_b = jax.grad(_loss, argnums=(2, 3))(matmul, spec, a, b, weights)
    assert grad_a.dtype == grad_b.dtype == jnp.bfloat16
    # Reference: the cotangent (here `weights`) rounded to bf16, everything else in float32.
    g = weights.astype(jnp.bfloat16).astype(jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    ref_a, ref_b = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), f32(a), f32(b))[1](g)
    np.testing.assert_allclose(f32(grad_a), ref_a, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(f32(grad_b), ref_b, rtol=1e-2, atol=1e-2)


def _dot_operand_types(jaxpr) -> set[tuple[str, str]]:
    """(lhs, rhs) dtypes of every dot_general in a jaxpr, sub-jaxprs (custom_vjp) included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found |= _dot_operand_types(inner)
    return found


def test_bf16_backward_has_no_float32_matmul():
    """The point of matmul: every dot of the backward takes bf16 operands (a plain einsum
    with float32 output gives float32 x float32 dots there)."""
    spec = "abi,io->abo"
    a, b = jnp.ones((2, 6, 16), jnp.bfloat16), jnp.ones((16, 24), jnp.bfloat16)

    def dot_types(fn):
        grads = jax.grad(lambda a, b: jnp.sum(fn(a, b) ** 2), argnums=(0, 1))
        return _dot_operand_types(jax.make_jaxpr(grads)(a, b).jaxpr)

    plain = dot_types(lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32))
    assert ("float32", "bfloat16") in plain or ("float32", "float32") in plain, plain
    assert dot_types(lambda a, b: matmul(spec, a, b)) == {("bfloat16", "bfloat16")}
