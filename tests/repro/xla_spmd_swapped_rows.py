"""XLA SPMD partitioner miscompiles a dot on a 3-axis mesh: pure JAX, no llava_jax.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/repro/xla_spmd_swapped_rows.py
    (add --gspmd to use the GSPMD propagation instead of Shardy: same wrong result)

y = x @ w.T  with
    x [96, 64]  sharded P(('data', 'fsdp'), 'tensor')   (rows over two axes, contraction dim over 'tensor')
    w [64, 64]  sharded P('fsdp', 'tensor')              (output dim over 'fsdp', contraction dim over 'tensor')
    y [96, 64]  out_shardings P(('data', 'fsdp'), 'tensor')
on the mesh (data=2, fsdp=2, tensor=2). The partitioned HLO all-gathers w over 'fsdp', permutes
x's row blocks between devices 2<->4 and 3<->5 (collective-permute) to a fsdp-major row order,
and never permutes the result back: the row blocks of (data 0, fsdp 1) and (data 1, fsdp 0)
come back swapped. Wrong on meshes with data > 1 and fsdp == tensor > 1 ((2,2,2) of 8 devices,
(4,2,2) of 16); right on (1,4,2) (4,1,2) (2,1,4) (1,2,4) (2,4,1) (4,2,1) (1,8,1) (2,4,2) (2,2,4)
(1,8,2) (8,1,2), and right with w sharded P('tensor', 'fsdp') or y's columns replicated. Any
sizes (also 1024x512). Seen with jax/jaxlib 0.10.2 on XLA:CPU; the bug is in the partitioned HLO
(the shardings going into spmd-partitioning are consistent), so not CPU-specific.

In a model this is the backward of a second dense layer whose kernel is sharded like the first
one (embed->fsdp, mlp->tensor): dh = dy @ w2.T, dy column-sharded over 'tensor' (from w2's
output dim), dh column-sharded over 'tensor' (from the first layer's output): wrong gradients
for everything below that layer, while the loss is right.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

if "--gspmd" in sys.argv:
    jax.config.update("jax_use_shardy_partitioner", False)

mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
rng = np.random.RandomState(0)
x = rng.randn(96, 64).astype(np.float32)
w = rng.randn(64, 64).astype(np.float32)
expected = x @ w.T

rows = ("data", "fsdp")
f = jax.jit(lambda x, w: jnp.einsum("ro,io->ri", x, w),
            out_shardings=NamedSharding(mesh, P(rows, "tensor")))
xd = jax.device_put(x, NamedSharding(mesh, P(rows, "tensor")))
wd = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
got = np.asarray(f(xd, wd))

print("jax", jax.__version__, jax.devices()[0].platform,
      "shardy" if jax.config.jax_use_shardy_partitioner else "gspmd")
blocks = np.abs(got - expected).reshape(4, 24, 64).max(axis=(1, 2))
print("max abs error per row block (data, fsdp) = (0,0) (0,1) (1,0) (1,1):", np.round(blocks, 3))
print("swapped blocks:", np.allclose(got[24:48], expected[48:72], atol=1e-3)
      and np.allclose(got[48:72], expected[24:48], atol=1e-3))
if "--hlo" in sys.argv:
    print(f.lower(xd, wd).compile().as_text())
ok = np.allclose(got, expected, atol=1e-3)
print("ok" if ok else "WRONG RESULT")
sys.exit(0 if ok else 1)
