"""`python -m llava_jax.memory_plan`: per-device memory of a training config, planned ahead.

    python -m llava_jax.memory_plan --config=configs/finetune.py:13b --num_devices=8 \
        --preset=llava-v1.5-13b [--rows_per_device=16] [--config.model.remat_policy=full]

Compiles the real train step for `num_devices` fake CPU devices (llava_jax.training.memory_plan)
and prints, per device: parameters (trainable / frozen), optimizer state, XLA's argument /
output / temporary buffer sizes, the model FLOPs per step, and whether it fits each capacity.
Temporaries are XLA:CPU's plan: an estimate (+-20 %) of GPU/TPU's; parameter and optimizer
bytes are exact.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from llava_jax import checkpoint as ckpt
from llava_jax import sharding
from llava_jax.models.config import get_preset
from llava_jax.training.config import check_mesh_fits
from llava_jax.training.memory_plan import plan

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Fake devices must be requested before the CPU backend starts (at the first device use).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}")
    jax.config.update("jax_platforms", "cpu")
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
    # Nothing returned: absl's app.run passes main's return value to sys.exit, so returning the
    # plan printed it as an error and exited 1. Library users call training.memory_plan.plan.


if __name__ == "__main__":
    app.run(main)
