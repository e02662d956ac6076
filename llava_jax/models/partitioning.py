"""Sharding constraints on activations by logical axis names (MaxText / flax.linen's
`with_logical_constraint`), without the model knowing the mesh.

Model code names the dims of an activation:

    x = constrain(x, RESIDUAL)            # [batch, seq, embed]
    q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))

and whoever traces the step installs rules mapping those names to mesh axes, for the
duration of the trace:

    with axis_rules(llava_jax.sharding.DEFAULT_ACTIVATION_RULES):   # training/step.py
        ... trace the forward / backward ...

`constrain` is `jax.lax.with_sharding_constraint(x, PartitionSpec(...))` against the mesh in
context (`jax.set_mesh`), and returns x unchanged when no rules are installed or no mesh is
set: single-device runs, generation, tests without a mesh. The numbers never change; only
where XLA's SPMD partitioner puts each array, and so which collectives it emits.

Per dim, a rule's mesh axes are used when the mesh in context has them with size > 1 and no
earlier dim used them (others are dropped). The dim is left UNCONSTRAINED, XLA choosing as it
did without the constraint, when their product does not divide it (a batch of one on an fsdp
mesh, GQA with fewer KV heads than tensor shards) or one of them is not an Auto axis (Manual
inside shard_map, Explicit). A logical name without a rule is replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec

# Logical names of activation dims (the rules live in llava_jax.sharding).
BATCH = "activation_batch"  # rows (images for the vision tower)
LENGTH = "activation_length"  # sequence positions / image tokens
EMBED = "activation_embed"  # the residual stream's width
HEADS = "activation_heads"  # query heads
KV_HEADS = "activation_kv_heads"  # key / value heads (GQA)
HEAD_DIM = "activation_head_dim"
MLP = "activation_mlp"  # MLP hidden width (and a column-parallel projector layer's output)
VOCAB = "activation_vocab"  # logits

RESIDUAL = (BATCH, LENGTH, EMBED)  # [batch, seq, embed]: every layer's input and output

# The installed rules: None = constraints off. A context variable, set only while a step is
# traced (`axis_rules` inside the traced function), so a cached trace never sees stale rules.
_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("activation_rules",
                                                                     default=None)


def _as_axes(mesh_axes) -> tuple[str, ...]:
    """A rule's right-hand side ('' / None, 'tensor', ('data', 'fsdp')) as a tuple of names."""
    if not mesh_axes:
        return ()
    if isinstance(mesh_axes, str):
        return tuple(a.strip() for a in mesh_axes.split(",") if a.strip())
    return tuple(mesh_axes)


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, object]] | None) -> Iterator[None]:
    """Installs activation rules ((logical name, mesh axes), ...) for the block; None or ()
    turns constraints off inside it. Enter it inside the function being traced."""
    token = _RULES.set(None if not rules else {name: _as_axes(axes) for name, axes in rules})
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> dict | None:
    """{logical name: mesh axes tuple} installed now, or None."""
    return _RULES.get()


def _active() -> bool:
    """Rules installed and a mesh of several devices in context."""
    if _RULES.get() is None:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def logical_to_spec(shape: Sequence[int], logical_axes: Sequence[str | None], rules: dict,
                    mesh) -> PartitionSpec:
    """The PartitionSpec the rules give an array of `shape` on `mesh` (an AbstractMesh or
    Mesh); see the module docstring for how dims that cannot be sharded are handled."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Auto}
    spec, used = [], set()
    for dim, logical in zip(shape, logical_axes):
        axes = tuple(a for a in (rules.get(logical, ()) if logical else ())
                     if sizes.get(a, 1) > 1 and a not in used)
        if not axes:
            spec.append(None)
        elif any(a not in auto for a in axes) or dim % math.prod(sizes[a] for a in axes):
            spec.append(PartitionSpec.UNCONSTRAINED)
        else:
            spec.append(axes[0] if len(axes) == 1 else axes)
            used.update(axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """x with a sharding constraint from its dims' logical names (one per dim); x itself when
    no rules are installed or no mesh is in context."""
    if not _active():
        return x
    rules, mesh = _RULES.get(), jax.sharding.get_abstract_mesh()
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                         f"for an array of shape {x.shape}")
    spec = logical_to_spec(x.shape, logical_axes, rules, mesh)
    if all(s is PartitionSpec.UNCONSTRAINED for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)

