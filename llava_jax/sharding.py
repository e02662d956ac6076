"""Device mesh, logical axis rules, and global arrays from process-local batches.

Sharding is declared in two steps, as in MaxText:

  parameter path (regex)  ->  logical axes of its trailing dims   (`param_rules`)
  logical axis            ->  mesh axes                           (`logical_axis_rules`)

e.g. 'language_model/layers/mlp/up_proj/kernel' [layers, embed, mlp] -> (None, 'embed', 'mlp')
-> PartitionSpec(None, 'fsdp', 'tensor'). Leading dims a rule does not name (the stacked
[layers] axis) are replicated. The mesh has three axes:

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  tensor  Megatron-style tensor parallelism over heads / MLP width / vocabulary

Batches are split over (data, fsdp). Activations are constrained at the points that decide
the collectives (`activation_rules`: logical activation axis -> mesh axes, applied by
`llava_jax.models.partitioning.constrain` while the train step is traced, training/step.py):
rows over (data, fsdp) everywhere; heads, MLP width and vocabulary over tensor; the residual
stream [batch, seq, embed] split by rows only (embed and seq whole), so FSDP all-gathers
weights, never activations, and tensor parallelism is Megatron's (one all-reduce after o_proj
/ down_proj).
Between the constraints the mesh's Auto axes leave XLA's sharding propagation free.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax.tree import flat_path

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the flat parameter path, logical axes of the trailing dims). First match wins.
DEFAULT_PARAM_RULES = (
    (r"embed_tokens/embedding$", "vocab,embed"),  # [vocab, d]
    (r"lm_head/kernel$", "embed,vocab"),  # [d, vocab]
    (r"self_attn/(q|k|v)_proj/kernel$", "embed,heads"),  # [d, heads * head_dim]
    (r"self_attn/(o|out)_proj/kernel$", "heads,embed"),
    (r"self_attn/(q|k|v)_proj/bias$", "heads"),
    (r"mlp/(gate|up)_proj/kernel$|layers/fc1/kernel$", "embed,mlp"),
    (r"mlp/down_proj/kernel$|layers/fc2/kernel$", "mlp,embed"),
    (r"layers/fc1/bias$", "mlp"),
    # Projector layers alternate column / row parallel like up_proj / down_proj: linear_1, 3, ..
    # [in, out] -> (fsdp, tensor); linear_2, 4, .. -> (tensor, fsdp). Not (fsdp, tensor) for
    # all: linear_2's backward dh = dy @ kernel.T (dy and dh column-sharded over 'tensor', the
    # kernel's rows over 'fsdp') is miscompiled by XLA's SPMD partitioner when data > 1 and
    # fsdp == tensor > 1, e.g. 2x2x2 (row blocks of two devices swapped; jax 0.10.2, GSPMD and
    # Shardy): wrong gradients for linear_1 and the vision tower, right loss. This layout also
    # moves ~2x less data. tests/test_sharding.py compares every gradient on 8 devices with 1.
    (r"multi_modal_projector/linear_\d*[02468]/kernel$", "mlp,embed"),
    (r"multi_modal_projector/linear_\d+/kernel$", "embed,mlp"),
    # LoRA (models/lora.py): A [in, rank] splits like its kernel's input dim, B [rank, out]
    # like its output dim; quantized codes [in (/ 2), out] and scales [blocks, out] like the
    # kernel (a dim the mesh does not divide stays whole).
    (r"(q|k|v|gate|up)_proj/lora_a$|layers/fc1/lora_a$", "embed,_"),
    (r"(o|out)_proj/lora_a$", "heads,_"),
    (r"down_proj/lora_a$|layers/fc2/lora_a$", "mlp,_"),
    (r"self_attn/(q|k|v)_proj/lora_b$", "_,heads"),
    (r"(o|out|down)_proj/lora_b$|layers/fc2/lora_b$", "_,embed"),
    (r"mlp/(gate|up)_proj/lora_b$|layers/fc1/lora_b$", "_,mlp"),
    (r"self_attn/(q|k|v)_proj/kernel_(codes|scale)$", "embed,heads"),
    (r"self_attn/(o|out)_proj/kernel_(codes|scale)$", "heads,embed"),
    (r"mlp/(gate|up)_proj/kernel_(codes|scale)$|layers/fc1/kernel_(codes|scale)$", "embed,mlp"),
    (r"mlp/down_proj/kernel_(codes|scale)$|layers/fc2/kernel_(codes|scale)$", "mlp,embed"),
    (r"patch_embedding$", "_,_,_,embed"),  # [kh, kw, channels, d]
    (r"position_embedding$", "_,embed"),
    (r".*", ""),  # norms, other biases, class embedding: replicated (small)
)
# logical axis -> mesh axis (or '' for replicated).
DEFAULT_LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)
# Activations: logical axis (llava_jax.models.partitioning) -> mesh axes ('' = replicated; a
# name without a rule is replicated). Not ("activation_embed", "fsdp"): parameters are sharded
# over fsdp on their embed dim, activations never are (that would gather rows or weights at
# every matmul). Sequence positions and head_dim stay whole.
DEFAULT_ACTIVATION_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", ""),
    ("activation_embed", ""),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", ""),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class MeshConfigError(ValueError):
    pass


def check_activation_rules(rules, field: str = "mesh.activation_rules") -> None:
    """Every rule maps a name to mesh axes of MESH_AXES ('' / a name / a tuple of names)."""
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshConfigError(f"{field}: {rule!r} is not a (logical axis, mesh axes) pair.")
        axes = rule[1]
        names = ([a.strip() for a in axes.split(",") if a.strip()] if isinstance(axes, str)
                 else list(axes or ()))
        unknown = [a for a in names if a not in MESH_AXES]
        if unknown:
            raise MeshConfigError(f"{field} maps {rule[0]!r} to unknown mesh axes {unknown}; "
                                  f"use names of {MESH_AXES} ('' = replicated).")


# ----- mesh -----

def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one of them may be -1 = 'all remaining devices'."""
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    fields = ", ".join(f"mesh.{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if sum(size == -1 for size in sizes) > 1:
        raise MeshConfigError(f"At most one of mesh.data/fsdp/tensor may be -1 ({fields}).")
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise MeshConfigError(f"mesh.{name}={size}: use a positive size or -1 (the rest).")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshConfigError(f"{fields}: the fixed axes ({known} devices) do not divide the "
                                  f"{num_devices} devices.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshConfigError(f"{fields} needs {math.prod(sizes)} devices but {num_devices} are "
                              "available; set one axis to -1 to take the rest.")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    # Auto axis types: the model has no sharding annotations of its own, so XLA must be free to
    # propagate shardings through it (Explicit axes would reject the unannotated matmuls).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


# ----- parameters -----

def _parse_axes(axes: str) -> tuple[str | None, ...]:
    if not axes:
        return ()
    return tuple(None if a.strip() in ("", "_") else a.strip() for a in axes.split(","))


def logical_axes(path: str, ndim: int, param_rules=DEFAULT_PARAM_RULES) -> tuple[str | None, ...]:
    """Logical axis names for each dim of the parameter at `path`."""
    for pattern, axes in param_rules:
        if re.search(pattern, path):
            trailing = _parse_axes(axes)[-ndim:] if ndim else ()
            return (None,) * (ndim - len(trailing)) + trailing
    return (None,) * ndim


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, param_rules=DEFAULT_PARAM_RULES,
                   logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of one parameter; a dim its mesh axis does not divide stays replicated."""
    to_mesh = {logical: (mesh_axis or None) for logical, mesh_axis in logical_axis_rules}
    spec, used = [], set()
    for dim, logical in zip(shape, logical_axes(path, len(shape), param_rules)):
        mesh_axis = to_mesh.get(logical) if logical else None
        if mesh_axis is not None and mesh_axis not in MESH_AXES:
            raise MeshConfigError(f"mesh.logical_axis_rules maps {logical!r} to unknown mesh axis "
                                  f"{mesh_axis!r}; use one of {MESH_AXES}.")
        size = mesh.shape[mesh_axis] if mesh_axis else 1
        if mesh_axis is None or size == 1 or mesh_axis in used:
            spec.append(None)
        elif dim % size:
            # Small odd-sized dims (biases, toy models) are cheaper replicated than padded.
            logging.log_first_n(logging.INFO, "%s: dim %d not divisible by mesh axis %s=%d; "
                                "replicated", 20, path, dim, mesh_axis, size)
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return P(*spec)


def param_shardings(abstract_params, mesh: Mesh, param_rules=DEFAULT_PARAM_RULES,
                    logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES):
    """NamedSharding for every leaf of a nested params dict (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: NamedSharding(mesh, partition_spec(
            flat_path(kp), leaf.shape, mesh, param_rules, logical_axis_rules)),
        abstract_params)


def state_shardings(abstract_state, params_shardings, mesh: Mesh):
    """Shardings for an optimizer state: leaves that mirror a parameter take its sharding.

    Optax states hold parameter-shaped trees (Adam's mu and nu) next to scalars (counts).
    A state leaf whose key path ends with a parameter's key path and has the same shape is
    sharded like that parameter; everything else is replicated.
    """
    by_path = {}
    for key_path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[tuple(str(getattr(k, "key", k)) for k in key_path)] = sharding
    longest = max((len(k) for k in by_path), default=0)
    replicated = NamedSharding(mesh, P())

    def pick(key_path, leaf):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)
        for length in range(min(longest, len(keys)), 0, -1):
            sharding = by_path.get(keys[-length:])
            if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes of one device's shards of a tree (exact, from shapes and shardings)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


# ----- batches -----

def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 1) -> NamedSharding:
    """Rows (dim `batch_dim`) split over (data, fsdp); everything else replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def batch_rows_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, batch_dim: int = 1) -> dict:
    """Process-local numpy arrays -> global jax.Arrays sharded over (data, fsdp).

    Each process passes its own rows (dim `batch_dim`); the global array concatenates them in
    process order. On one process this is a sharded device_put.
    """
    out = {}
    processes = jax.process_count()
    for name, value in local_batch.items():
        sharding = batch_sharding(mesh, value.ndim, batch_dim)
        global_shape = list(value.shape)
        global_shape[batch_dim] *= processes
        out[name] = jax.make_array_from_process_local_data(sharding, value, tuple(global_shape))
    return out


# ----- multi-host -----

# Set by launch/local.py (several processes on one machine) beside JAX_COORDINATOR_ADDRESS.
# JAX reads only the address; these two are passed to jax.distributed.initialize explicitly.
NUM_PROCESSES_ENV = "LLAVA_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "LLAVA_JAX_PROCESS_ID"


def launcher_processes(env=None) -> tuple[int, int] | None:
    """(process count, process id) from launch/local.py's variables; None when they are unset.

    Malformed or incomplete values are a ValueError naming the variables.
    """
    env = os.environ if env is None else env
    count, index = env.get(NUM_PROCESSES_ENV), env.get(PROCESS_ID_ENV)
    if count is None and index is None:
        return None
    given = f"{NUM_PROCESSES_ENV}={count!r}, {PROCESS_ID_ENV}={index!r}"
    if count is None or index is None:
        raise ValueError(f"{given}: set both (launch/local.py does) or neither.")
    try:
        count, index = int(count), int(index)
    except ValueError:
        raise ValueError(f"{given}: both must be integers.") from None
    if not 0 <= index < count:
        raise ValueError(f"{given}: need 0 <= process id < process count.")
    if not env.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError(f"{given} but JAX_COORDINATOR_ADDRESS is not set (host:port of "
                         "process 0).")
    return count, index


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` when launched as one of several processes.

    mode: 'auto' (initialize when the environment says there are several processes),
    'yes' or 'no'. Detection: LLAVA_JAX_NUM_PROCESSES / LLAVA_JAX_PROCESS_ID with
    JAX_COORDINATOR_ADDRESS (launch/local.py: processes on one machine; passed explicitly, JAX's
    cluster detection is skipped), JAX_COORDINATOR_ADDRESS (launch/slurm_gpu.py sets it, with
    JAX_LOCAL_DEVICE_IDS so each per-node process keeps all its GPUs), SLURM_NTASKS > 1, or a
    multi-worker Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts). Must run before any
    other JAX call. Returns whether it initialized.
    """
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"distributed={mode!r}: use 'auto', 'yes' or 'no'.")
    if mode == "no":
        return False
    env = os.environ
    launched = launcher_processes(env)
    if mode == "auto":
        multi = (launched is not None
                 or bool(env.get("JAX_COORDINATOR_ADDRESS"))
                 or int(env.get("SLURM_NTASKS", "1") or 1) > 1
                 or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
        if not multi:
            return False
    if launched is not None:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=launched[0],
                                   process_id=launched[1], cluster_detection_method="deactivate")
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True
