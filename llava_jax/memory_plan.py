"""`python -m llava_jax.memory_plan`: per-device memory of a training config, planned ahead.

    python -m llava_jax.memory_plan --config=configs/finetune.py:13b --preset=llava-v1.5-13b \
        --topology=v5p-8 [--rows_per_device=16] [--json=plan.json]
    python -m llava_jax.memory_plan --config=configs/finetune.py:7b --preset=llava-v1.5-7b \
        --num_devices=8 --device_memory_gb=80,40 [--config.model.remat_policy=full]

Compiles the real train step ahead of time (llava_jax.training.memory_plan) and prints, per
device: parameters (trainable / frozen), optimizer state, the compiler's argument / output /
temporary buffer sizes, the model FLOPs per step, the compile time, the bytes each kind of
collective returns per step (all-gather, reduce-scatter, all-reduce, ...; --json key
"collectives"), and whether it fits.

  --topology=v5p-8 (v4-8, v5litepod-8, v6e-8, larger slices, or v5p:2x2x1): the real TPU
      compiler (libtpu, from the `tpu` extra: pip install -e '.[tpu]') compiles for the
      slice's abstract devices on this machine; the capacity is the chip's HBM.
  otherwise: `--num_devices` fake CPU devices; XLA:CPU's temporaries are an estimate (+-20 %)
      of a GPU's; capacities from --device_memory_gb (80 / 40 for A100/H100 80 GB, A100 40 GB).
Parameter and optimizer bytes are exact either way. --json=FILE writes the numbers.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from llava_jax import checkpoint as ckpt
from llava_jax import sharding
from llava_jax.data.anyres import AnyresSpec
from llava_jax.models.attention import select_implementation
from llava_jax.models.config import get_preset
from llava_jax.training.config import check_mesh_fits
from llava_jax.training.memory_plan import GIB, DoesNotFit, plan, tpu_target

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:preset].",
                                          lock_config=False)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Fake CPU devices of the planned mesh "
                                    "(ignored with --topology).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice to compile for with the TPU "
                                "compiler: v5p-8, v4-8, v5litepod-8, v6e-8, ... or v5p:2x2x1.")
_PRESET = flags.DEFINE_string("preset", "", "LlavaConfig preset when config.model.base_dir "
                              "does not exist here (e.g. llava-v1.5-13b).")
_ROWS = flags.DEFINE_integer("rows_per_device", 0, "Rows per device per micro-batch "
                             "(0 = optim.global_batch_size / grad_accum_steps / data-parallel).")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Row length (0 = data.max_length).")
_IMAGES = flags.DEFINE_integer(
    "images_per_row", None, "Image slots per row (0 = text only; default 1); tiled (anyres) "
    "models: tile slots per row (default: one image at the largest pinpoint, base + grid).")
_MEMORY = flags.DEFINE_list("device_memory_gb", ["80", "40"], "Capacities (GiB) to check "
                            "against without --topology; the first goes to --json.")
_JSON = flags.DEFINE_string("json", "", "Also write the plan to this JSON file.")
# 10 % of a device's memory is left to the runtime, NCCL / ICI buffers and fragmentation.
USABLE_FRACTION = 0.9


def _model_config(config):
    if _PRESET.value:
        model_config = get_preset(_PRESET.value)
    elif config.model.base_dir and os.path.isdir(config.model.base_dir):
        model_config = ckpt.read_config(config.model.base_dir)
    else:
        sys.exit(f"config.model.base_dir={config.model.base_dir!r} is not here: pass --preset.")
    return model_config.replace(
        dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers,
        attention=config.model.attention)


def _devices_and_capacities() -> tuple[list, list[tuple[str, int]]]:
    """The devices to plan for and [(label, bytes per device)] to check against."""
    if _TOPOLOGY.value:
        try:
            target = tpu_target(_TOPOLOGY.value)
            devices = target.devices()
        except (ValueError, RuntimeError) as error:
            sys.exit(f"--topology: {error}")
        capacity = target.device_memory_bytes(len(devices))
        return devices, [(f"{target.name} ({capacity / GIB:.1f} GiB per device)", capacity)]
    devices = jax.devices()
    if len(devices) != _NUM_DEVICES.value:
        sys.exit(f"got {len(devices)} devices, wanted {_NUM_DEVICES.value} (JAX already started?)")
    try:
        capacities = [(f"{gb} GB device", int(float(gb) * GIB)) for gb in _MEMORY.value]
    except ValueError:
        sys.exit(f"--device_memory_gb={','.join(_MEMORY.value)}: expected numbers (GiB).")
    return devices, capacities



def _report_refusal(refused: DoesNotFit, capacities, model_config, devices, seq_len,
                    rows_per_device, mesh, gib) -> None:
    """The compiler would not build the step for this memory: print and record why."""
    for name, size in refused.state_bytes.items():
        print(f"  {name:<18} {gib(size)}  per device")
    if refused.temporaries:
        print(f"  temporaries        {gib(refused.temporaries)}  per device (compiler's count)")
    print(f"  does NOT fit: the compiler refused the step: {refused.message}")
    if not _JSON.value:
        return
    label, capacity = capacities[0]
    state = sum(refused.state_bytes.values())
    record = {
        # A lower bound: the compiler stopped before laying out every buffer.
        "peak_bytes_per_device": state + refused.temporaries,
        "device_memory_bytes": capacity, "fits": False,
        "fits_by_capacity": {label: False},
        "attention": select_implementation(model_config.attention, devices[0].platform, seq_len,
                                           getattr(devices[0], "device_kind", "")),
        "params_bytes": refused.state_bytes["trainable_params"] +
                        refused.state_bytes["frozen_params"],
        "optimizer_bytes": refused.state_bytes["optimizer_state"],
        "temporaries_bytes": refused.temporaries, "compile_seconds": refused.compile_seconds,
        "flops_per_device": None, "rows_per_device": rows_per_device, "seq_len": seq_len,
        "target": _TOPOLOGY.value or f"{len(devices)}x cpu", "mesh": dict(mesh.shape),
        "compiler_error": refused.message, **refused.state_bytes,
    }
    with open(_JSON.value, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(f"plan: {_JSON.value}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _TOPOLOGY.value:
        # libtpu reads these at start-up; on a machine without TPUs it otherwise logs errors
        # about undiscoverable workers (harmless: nothing runs on the abstract devices).
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", _TOPOLOGY.value.replace(":", "-"))
        # libtpu takes a machine-wide lock file, so a second planner (or a test run in
        # parallel) would fail; compiling for abstract devices opens no TPU, so sharing is safe.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    else:
        # Fake devices must be requested before the CPU backend starts (at the first device use).
        # XLA:CPU's default scheduler orders ops for thread concurrency and keeps more buffers
        # alive than a GPU's memory-aware scheduler would (7B stage 2 at 16 rows: +3 GiB per
        # device); the memory-minimising order is the better stand-in for a GPU plan.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}"
                                   " --xla_cpu_enable_concurrency_optimized_scheduler=false")
    jax.config.update("jax_platforms", "cpu")  # the host; TPU devices come from the topology
    config = _CONFIG.value
    model_config = _model_config(config)
    devices, capacities = _devices_and_capacities()
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
    images_per_row = _IMAGES.value
    if images_per_row is None:
        images_per_row = (AnyresSpec.from_config(model_config).max_tiles if model_config.anyres
                          else 1)
    print(f"{_PRESET.value or config.model.base_dir}: stage {config.stage}, "
          f"{_TOPOLOGY.value or f'{len(devices)} CPU devices'}, mesh "
          f"{dict(mesh.shape)}, {rows_per_device} rows x {seq_len} tokens per device per "
          f"micro-batch, {images_per_row} {'tile' if model_config.anyres else 'image'} slots "
          f"per row, {config.optim.grad_accum_steps} micro-batches, remat="
          f"{config.model.remat_policy}, {config.model.param_dtype} params / "
          f"{config.model.dtype} compute, loss_chunk_size={config.loss_chunk_size}", flush=True)
    gib = lambda b: f"{b / GIB:8.2f} GiB"
    try:
        result = plan(config, model_config, mesh, rows=rows_per_device * data_parallel,
                      seq_len=seq_len, images_per_row=images_per_row)
    except DoesNotFit as refused:
        _report_refusal(refused, capacities, model_config, devices, seq_len, rows_per_device,
                        mesh, gib)
        return
    for name in ("trainable_params", "frozen_params", "optimizer_state", "arguments", "outputs",
                 "aliased", "temporaries", "peak_estimate"):
        print(f"  {name:<18} {gib(result[name])}  per device")
    print(f"  model FLOPs/step   {result['model_flops_per_device'] / 1e12:8.2f} TFLOP per device "
          f"(compiler's cost analysis: {result['xla_flops_per_device'] / 1e12:.2f}; XLA counts "
          "a scanned layer once)")
    print(f"  compile time       {result['compile_seconds']:8.1f} s ({result['platform']} compiler)")
    collectives = ", ".join(f"{kind} {gib(count).strip()}"
                            for kind, count in result["collectives"].items() if count)
    sent = sum(result["collectives_wire_bytes"].values())
    print(f"  collectives/step   {collectives or 'none'}  per device (result bytes); "
          f"{gib(sent).strip()} sent per device (ring estimate)")
    fits = {label: result["peak_estimate"] <= USABLE_FRACTION * capacity
            for label, capacity in capacities}
    for label, fit in fits.items():
        print(f"  {label}: {'fits' if fit else 'does NOT fit'} (90 % usable)")
    if _JSON.value:
        first_label, first_capacity = capacities[0]
        record = {
            "peak_bytes_per_device": result["peak_estimate"],
            "device_memory_bytes": first_capacity,
            "fits": fits[first_label],
            "fits_by_capacity": fits,
            # What the decoder's attention resolves to on the target (training length).
            "attention": select_implementation(
                model_config.attention, result["platform"], seq_len,
                getattr(devices[0], "device_kind", "")),
            "params_bytes": result["trainable_params"] + result["frozen_params"],
            "optimizer_bytes": result["optimizer_state"],
            "temporaries_bytes": result["temporaries"],
            "flops_per_device": result["model_flops_per_device"],
            "rows_per_device": rows_per_device,
            "seq_len": seq_len,
            "target": _TOPOLOGY.value or f"{len(devices)}x cpu",
            "mesh": dict(mesh.shape),
            **result,  # every number plan() measured, under its own name (incl. compile_seconds)
        }
        with open(_JSON.value, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        print(f"plan: {_JSON.value}")
    # Nothing returned: absl's app.run passes main's return value to sys.exit, so returning the
    # plan printed it as an error and exited 1. Library users call training.memory_plan.plan.


if __name__ == "__main__":
    app.run(main)
