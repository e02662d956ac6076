"""Recommended batch layout per hardware target, from the memory plan (BUILD_NOTES.md).

    python -m llava_jax.train --config=configs/finetune.py:13b,v5p-8 ...
    python -m llava_jax.train --config=configs/pretrain.py:7b,8x40g ...

The global batch (LLaVA's 256 for stage 1, 128 for stage 2) never changes: a target picks the
rows per device of one micro-batch, the largest power of two that `python -m
llava_jax.memory_plan` found to fit at 2048 tokens with full remat and FSDP over every device
(float32 master weights and Adam state, bf16 compute), and gradient accumulation makes up the
rest. TPU rows come from the TPU compiler itself (AOT on a CPU machine); GPU rows from XLA:CPU's
buffer plan for 8 fake devices, an estimate of a GPU's (labelled as such in BUILD_NOTES).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Target:
    devices: int  # accelerators (TPU chips, or GPUs) the mesh spans
    memory_gib: float  # per device
    label: str


TARGETS = {
    "v5p-8": Target(4, 95.0, "TPU v5p-8 (4 chips, 95 GiB HBM each)"),
    "v6e-8": Target(8, 32.0, "TPU v6e-8 (8 chips, 32 GiB)"),
    "v5litepod-8": Target(8, 16.0, "TPU v5e-8 (8 chips, 16 GiB)"),
    "8x80g": Target(8, 80.0, "8 GPUs of 80 GB (A100 / H100)"),
    "8x40g": Target(8, 40.0, "8 GPUs of 40 GB (A100 40G)"),
}

# (size, stage, target) -> rows per device per micro-batch (memory_plan, 2048 tokens). A pair
# missing here does not fit at one row (e.g. 13B stage 2 on v5e: its float32 weights and Adam
# state alone take 18.4 GiB per chip of 16).
ROWS_PER_DEVICE: dict[tuple[str, int, str], int] = {
    # stage 1: the projector trains; the frozen LLM is still differentiated through
    ("7b", 1, "v5p-8"): 32, ("7b", 1, "v6e-8"): 16, ("7b", 1, "v5litepod-8"): 4,
    ("7b", 1, "8x80g"): 32, ("7b", 1, "8x40g"): 16,
    ("13b", 1, "v5p-8"): 32, ("13b", 1, "v6e-8"): 8, ("13b", 1, "v5litepod-8"): 2,
    ("13b", 1, "8x80g"): 16, ("13b", 1, "8x40g"): 8,
    # stage 2: projector + LLM with Adam state
    ("7b", 2, "v5p-8"): 32, ("7b", 2, "v6e-8"): 4,
    ("7b", 2, "8x80g"): 16, ("7b", 2, "8x40g"): 8,
    ("13b", 2, "v5p-8"): 2,
    ("13b", 2, "8x80g"): 16, ("13b", 2, "8x40g"): 4,  # 4 x 4: in-backward accumulation
}


def apply_target(config, size: str, stage: int, target: str) -> None:
    """Sets the mesh, micro-batch rows and gradient accumulation for `target` in place."""
    if target not in TARGETS:
        raise ValueError(f"unknown hardware target {target!r}: use one of {sorted(TARGETS)}")
    rows = ROWS_PER_DEVICE.get((size, stage, target))
    if rows is None:
        raise ValueError(
            f"llava-v1.5-{size} stage {stage} does not fit {TARGETS[target].label} at one row "
            "of 2048 tokens (BUILD_NOTES.md, memory plan): use more devices, a larger target "
            "or mesh.tensor > 1.")
    devices = TARGETS[target].devices
    per_step = config.optim.global_batch_size
    if per_step % (rows * devices):
        raise ValueError(f"global batch {per_step} does not split into {rows} rows x "
                         f"{devices} devices")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.optim.grad_accum_steps = per_step // (rows * devices)
    config.model.remat_policy = "full"


def parse_arg(arg: str | None, sizes: tuple[str, ...], config_file: str) -> tuple[str, str]:
    """'7b' | '13b,v5p-8' -> (size, target or '')."""
    size, _, target = (arg or sizes[0]).partition(",")
    if size not in sizes:
        raise ValueError(f"{config_file}:{arg}: use SIZE or SIZE,TARGET with SIZE in {sizes} "
                         f"and TARGET in {sorted(TARGETS)}")
    return size, target
