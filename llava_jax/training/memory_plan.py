"""Memory and FLOPs of a train step on a mesh you do not have, compiled ahead of time.

`plan` compiles the real train step (same shardings, optimizer, remat, loss chunking) with
`jax.jit(...).lower(abstract args).compile()` for the given mesh and returns, per device:
parameters (trainable / frozen), optimizer state, the compiler's argument / output / temporary
buffer sizes, the model FLOPs per step, the compile time and the collective bytes per step
(training/hlo_stats.py, read from the compiled HLO). Nothing is allocated.
The command line is `python -m llava_jax.memory_plan` (llava_jax/memory_plan.py).

Two kinds of mesh:
  * fake CPU devices (`--xla_force_host_platform_device_count`): XLA:CPU plans the buffers;
    fusion and scheduling on GPU differ, so read temporaries as an estimate (+-20 %);
  * abstract TPU devices of a slice (`tpu_target("v5p-8")`): the real TPU compiler (libtpu,
    the `tpu` extra) compiles the step on this CPU machine, with its own memory plan.
Parameter and optimizer bytes are exact either way.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import numpy as np
from jax.experimental import topologies

from llava_jax import sharding
from llava_jax.training import hlo_stats
from llava_jax.training.metrics import train_step_flops
from llava_jax.training.state import build_setup, with_shardings


GIB = 2**30
# HBM per chip (public specs) and how many TensorCores gcloud counts per chip in a slice name
# (v4-8 and v5p-8 are 4 chips; v5litepod-8 and v6e-8 are 8).
TPU_GENERATIONS = {
    # gcloud prefix: (topology prefix, HBM GiB per chip, cores counted per chip)
    "v4": ("v4", 32, 2),
    "v5p": ("v5p", 95, 2),
    "v5litepod": ("v5e", 16, 1),
    "v5e": ("v5e", 16, 1),
    "v6e": ("v6e", 32, 1),
}
# Chips -> the slice's chip grid (3D tori for v4/v5p, 2D for v5e/v6e), as gcloud builds them.
TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"}
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU slice to compile for: its name, topology string, chips and memory per device."""

    name: str  # as given: "v5p-8" (gcloud accelerator type) or "v5p:2x2x1"
    topology: str  # jax.experimental.topologies name, e.g. "v5p:2x2x1"
    chips: int
    hbm_bytes_per_chip: int

    def devices(self) -> list:
        """The slice's abstract TPU devices (nothing runs on them; they compile)."""
        try:
            description = topologies.get_topology_desc(topology_name=self.topology,
                                                       platform="tpu")
        except Exception as error:  # jax raises RuntimeError/ValueError/XlaRuntimeError here
            raise RuntimeError(
                f"cannot get the TPU topology {self.topology!r} ({self.name}): {error}. The TPU "
                "compiler comes with the `tpu` extra: pip install -e '.[tpu]'.") from error
        return list(description.devices)

    def device_memory_bytes(self, num_devices: int) -> int:
        """HBM per JAX device (a chip, or a core where the topology lists cores)."""
        return self.hbm_bytes_per_chip * self.chips // num_devices


def tpu_target(name: str) -> TpuTarget:
    """"v5p-8" / "v4-8" / "v5litepod-8" / "v6e-8" (gcloud names) or "v5p:2x2x1" -> TpuTarget."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip())
    if not match:
        raise ValueError(f"unknown TPU topology {name!r}: use a gcloud accelerator type "
                         f"({', '.join(p + '-8' for p in TPU_GENERATIONS)}, ...) or a "
                         "topology such as v5p:2x2x1.")
    generation, count, grid = match.groups()
    prefix, hbm_gib, cores_per_chip = TPU_GENERATIONS[generation]
    if grid is not None:
        chips = int(np.prod([int(n) for n in grid.split("x")]))
    else:
        chips, remainder = divmod(int(count), cores_per_chip)
        shapes = TORUS_3D if cores_per_chip == 2 else GRID_2D
        if remainder or chips not in shapes:
            raise ValueError(f"{name}: {generation} slices here are "
                             f"{', '.join(f'{generation}-{c * cores_per_chip}' for c in shapes)}"
                             " (or give the topology, e.g. v5p:2x2x1).")
        grid = shapes[chips]
    return TpuTarget(name, f"{prefix}:{grid}", chips, hbm_gib * GIB)


class DoesNotFit(RuntimeError):
    """The compiler itself refused the step: its buffers exceed the device's memory.

    message: the compiler's one-line reason; state_bytes: the parameter and optimizer bytes
    per device (known without compiling); temporaries: the temporaries the compiler said it
    needed, in bytes (0 when the message does not say).
    """

    def __init__(self, message: str, state_bytes: dict, compile_seconds: float):
        line = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message)
        self.message = line[line.index("RESOURCE_EXHAUSTED"):].strip()
        super().__init__(self.message)
        self.state_bytes = state_bytes
        self.compile_seconds = compile_seconds
        found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", self.message)
        self.temporaries = (int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
                            if found else 0)


def plan(config, model_config, mesh, *, rows: int, seq_len: int, images_per_row: int) -> dict:
    """Compiles the step for abstract inputs; returns sizes in bytes and FLOPs per device.

    rows: rows of one micro-batch over the whole mesh; seq_len: their length;
    images_per_row: image slots per row (0 = a text-only batch); tiled (anyres) models: tile
    slots per row (data.max_tiles_per_row), in the training batch's tiled form.
    """
    setup = build_setup(config, model_config, mesh, total_steps=1000)
    accum = config.optim.grad_accum_steps
    batch = {name: jax.ShapeDtypeStruct((accum, rows, seq_len), np.int32)
             for name in ("input_ids", "labels", "segment_ids", "positions")}
    if images_per_row:
        size = model_config.vision.image_size
        tile = (1,) if model_config.anyres else ()  # data/batching.py: one tile per slot
        batch["pixel_values"] = jax.ShapeDtypeStruct(
            (accum, rows, images_per_row, *tile, size, size, 3), np.float32)
        batch["image_mask"] = jax.ShapeDtypeStruct((accum, rows, images_per_row), np.bool_)
        if model_config.anyres:
            batch["image_feature_index"] = jax.ShapeDtypeStruct((accum, rows, seq_len, 4),
                                                                np.int32)
            batch["image_feature_weight"] = jax.ShapeDtypeStruct((accum, rows, seq_len, 4),
                                                                 np.float32)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
             for k, v in batch.items()}
    start = time.perf_counter()
    state_bytes = {
        "trainable_params": sharding.bytes_per_device(setup.abstract_trainable,
                                                      setup.trainable_shardings),
        "frozen_params": sharding.bytes_per_device(setup.abstract_frozen,
                                                   setup.frozen_shardings),
        "optimizer_state": sharding.bytes_per_device(setup.abstract_opt, setup.opt_shardings),
    }
    try:
        with jax.set_mesh(mesh):  # as the trainer traces it (splash attention needs the mesh)
            compiled = setup.train_step.lower(
                with_shardings(setup.abstract_trainable, setup.trainable_shardings),
                with_shardings(setup.abstract_frozen, setup.frozen_shardings),
                with_shardings(setup.abstract_opt, setup.opt_shardings), batch).compile()
    except jax.errors.JaxRuntimeError as error:
        # The TPU compiler refuses a program whose buffers exceed the chip's HBM.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise DoesNotFit(str(error), state_bytes, time.perf_counter() - start) from None
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    collectives = hlo_stats.collective_summary(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model_flops = train_step_flops(
        model_config, rows * accum, seq_len, images_per_row,
        train_projector=setup.trains_projector, train_llm=setup.trains_llm,
        with_images=bool(images_per_row))
    out = {
        **state_bytes,
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "model_flops_per_device": model_flops / mesh.size,
        "xla_flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "compile_seconds": compile_seconds,
        "platform": mesh.devices.flat[0].platform,
        # {kind: result bytes per device per step}; loops counted by their trip counts.
        "collectives": collectives["bytes"],
        # {kind: bytes each device sends per step}, estimated for ring algorithms.
        "collectives_wire_bytes": collectives["wire_bytes"],
    }
    # Live at the peak: inputs (donated ones are reused for outputs) + temporaries.
    out["peak_estimate"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out
