"""Memory and FLOPs of a train step on a mesh you do not have, compiled ahead of time.

`plan` compiles the real train step (same shardings, optimizer, remat, loss chunking) with
`jax.jit(...).lower(abstract args).compile()` for the given mesh (fake CPU devices will do)
and returns, per device: parameters (trainable / frozen), optimizer state, XLA's argument /
output / temporary buffer sizes, and the model FLOPs per step. Nothing is allocated.
The command line is `python -m llava_jax.memory_plan` (llava_jax/memory_plan.py).

XLA:CPU plans the buffers: fusion and scheduling on GPU/TPU differ, so read temporaries as an
estimate (+-20 %); parameter and optimizer bytes are exact.
"""

from __future__ import annotations

import jax
import numpy as np

from llava_jax import sharding
from llava_jax.training.metrics import train_step_flops
from llava_jax.training.state import build_setup, with_shardings


def plan(config, model_config, mesh, *, rows: int, seq_len: int, images_per_row: int) -> dict:
    """Compiles the step for abstract inputs; returns sizes in bytes and FLOPs per device.

    rows: rows of one micro-batch over the whole mesh; seq_len: their length;
    images_per_row: image slots per row (0 = a text-only batch).
    """
    setup = build_setup(config, model_config, mesh, total_steps=1000)
    accum = config.optim.grad_accum_steps
    batch = {name: jax.ShapeDtypeStruct((accum, rows, seq_len), np.int32)
             for name in ("input_ids", "labels", "segment_ids", "positions")}
    if images_per_row:
        size = model_config.vision.image_size
        batch["pixel_values"] = jax.ShapeDtypeStruct(
            (accum, rows, images_per_row, size, size, 3), np.float32)
        batch["image_mask"] = jax.ShapeDtypeStruct((accum, rows, images_per_row), np.bool_)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
             for k, v in batch.items()}
    compiled = setup.train_step.lower(
        with_shardings(setup.abstract_trainable, setup.trainable_shardings),
        with_shardings(setup.abstract_frozen, setup.frozen_shardings),
        with_shardings(setup.abstract_opt, setup.opt_shardings), batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model_flops = train_step_flops(
        model_config, rows * accum, seq_len, images_per_row,
        train_projector=setup.trains_projector, train_llm=setup.trains_llm,
        with_images=bool(images_per_row))
    out = {
        "trainable_params": sharding.bytes_per_device(setup.abstract_trainable,
                                                      setup.trainable_shardings),
        "frozen_params": sharding.bytes_per_device(setup.abstract_frozen,
                                                   setup.frozen_shardings),
        "optimizer_state": sharding.bytes_per_device(setup.abstract_opt, setup.opt_shardings),
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "model_flops_per_device": model_flops / mesh.size,
        "xla_flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
    }
    # Live at the peak: inputs (donated ones are reused for outputs) + temporaries.
    out["peak_estimate"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out
