"""Memory and FLOPs of a train step on a mesh you do not have, compiled ahead of time.

    python -m llava_jax.memory_plan --config=configs/finetune.py:13b --num_devices=8 \
        --preset=llava-v1.5-13b [--rows_per_device=16] [--config.model.remat_policy=full]

Compiles the real train step (same shardings, optimizer, remat, loss chunking) with
`jax.jit(...).lower(abstract args).compile()` for `num_devices` fake CPU devices and prints,
per device: parameters (trainable / frozen), optimizer state, XLA's argument / output /
temporary buffer sizes, and the model FLOPs per step. Nothing is allocated.

XLA:CPU plans the buffers: fusion and scheduling on GPU/TPU differ, so read temporaries as an
estimate (+-20 %); parameter and optimizer bytes are exact.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:preset].",
                                          lock_config=False)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the planned mesh.")
_PRESET = flags.DEFINE_string("preset", "", "LlavaConfig preset when config.model.base_dir "
                              "does not exist here (e.g. llava-v1.5-13b).")
_ROWS = flags.DEFINE_integer("rows_per_device", 0, "Rows per device per micro-batch "
                             "(0 = optim.global_batch_size / grad_accum_steps / data-parallel).")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Row length (0 = data.max_length).")
_IMAGES = flags.DEFINE_integer("images_per_row", 1, "Image slots per row (0 = text only).")
_MEMORY = flags.DEFINE_list("device_memory_gb", ["80", "40"], "Capacities to check against.")


def plan(config, model_config, mesh, *, rows: int, seq_len: int, images_per_row: int) -> dict:
    """Compiles the step for abstract inputs; returns sizes in bytes and FLOPs per device."""
    import jax
    import numpy as np

    from llava_jax import metrics, sharding
    from llava_jax.trainer import build_step

    step = build_step(config, model_config, mesh, total_steps=1000)
    accum = config.optim.grad_accum_steps
    with_sharding = lambda tree, shardings: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    batch = {name: jax.ShapeDtypeStruct((accum, rows, seq_len), np.int32)
             for name in ("input_ids", "labels", "segment_ids", "positions")}
    if images_per_row:
        size = model_config.vision.image_size
        batch["pixel_values"] = jax.ShapeDtypeStruct(
            (accum, rows, images_per_row, size, size, 3), np.float32)
        batch["image_mask"] = jax.ShapeDtypeStruct((accum, rows, images_per_row), np.bool_)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=step["batch_sharding"])
             for k, v in batch.items()}
    compiled = step["train_step"].lower(
        with_sharding(step["abstract_trainable"], step["trainable_shardings"]),
        with_sharding(step["abstract_frozen"], step["frozen_shardings"]),
        with_sharding(step["abstract_opt"], step["opt_shardings"]), batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trainable = set(step["abstract_trainable"])
    model_flops = metrics.train_step_flops(
        model_config, rows * accum, seq_len, images_per_row,
        train_projector="multi_modal_projector" in trainable,
        train_llm="language_model" in trainable, with_images=bool(images_per_row))
    out = {
        "trainable_params": sharding.bytes_per_device(step["abstract_trainable"],
                                                      step["trainable_shardings"]),
        "frozen_params": sharding.bytes_per_device(step["abstract_frozen"],
                                                   step["frozen_shardings"]),
        "optimizer_state": sharding.bytes_per_device(step["abstract_opt"], step["opt_shardings"]),
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Fake devices must be requested before the CPU backend starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from llava_jax import checkpoint as ckpt, sharding
    from llava_jax.models.config import get_preset
    from llava_jax.trainer import check_mesh_fits

    config = _CONFIG.value
    if _PRESET.value:
        model_config = get_preset(_PRESET.value)
    elif config.model.base_dir and os.path.isdir(config.model.base_dir):
        model_config = ckpt.read_config(config.model.base_dir)
    else:
        sys.exit(f"config.model.base_dir={config.model.base_dir!r} is not here: pass --preset.")
    model_config = model_config.replace(
        dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers)
    devices = jax.devices()
    if len(devices) != _NUM_DEVICES.value:
        sys.exit(f"got {len(devices)} devices, wanted {_NUM_DEVICES.value} (JAX already started?)")
    mesh = sharding.make_mesh(config.mesh, devices)
    data_parallel = sharding.batch_rows_divisor(mesh)
    rows_per_device = _ROWS.value or (config.optim.global_batch_size //
                                      config.optim.grad_accum_steps // data_parallel)
    if _ROWS.value:
        with config.unlocked():
            config.optim.global_batch_size = (rows_per_device * data_parallel *
                                              config.optim.grad_accum_steps)
    check_mesh_fits(config, mesh)
    seq_len = _SEQ.value or config.data.max_length
    print(f"{_PRESET.value or config.model.base_dir}: stage {config.stage}, mesh "
          f"{dict(mesh.shape)}, {rows_per_device} rows x {seq_len} tokens per device per "
          f"micro-batch, {config.optim.grad_accum_steps} micro-batches, remat="
          f"{config.model.remat_policy}, {config.model.param_dtype} params / "
          f"{config.model.dtype} compute, loss_chunk_size={config.loss_chunk_size}", flush=True)
    result = plan(config, model_config, mesh, rows=rows_per_device * data_parallel,
                  seq_len=seq_len, images_per_row=_IMAGES.value)
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    for name in ("trainable_params", "frozen_params", "optimizer_state", "arguments", "outputs",
                 "aliased", "temporaries", "peak_estimate"):
        print(f"  {name:<18} {gib(result[name])}  per device")
    print(f"  model FLOPs/step   {result['model_flops_per_device'] / 1e12:8.2f} TFLOP per device "
          f"(XLA cost analysis: {result['xla_flops_per_device'] / 1e12:.2f}; it counts a scanned "
          "layer once)")
    for capacity in _MEMORY.value:
        fits = result["peak_estimate"] <= 0.9 * float(capacity) * 2**30  # 10 % for runtime/NCCL
        print(f"  {capacity} GB device: {'fits' if fits else 'does NOT fit'}")
    return result


if __name__ == "__main__":
    app.run(main)
