"""`python -m llava_jax.memory_plan` end to end: the real command on fake CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _memory_plan(*flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the command asks for its own device count
    return subprocess.run([sys.executable, "-m", "llava_jax.memory_plan",
                           "--config=configs/finetune.py", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_memory_plan_prints_every_line_and_checks_each_capacity():
    run = _memory_plan("--preset=tiny", "--num_devices=2", "--rows_per_device=1",
                       "--seq_len=64", "--device_memory_gb=80,0.000001")
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "stage 2, mesh {'data': 1, 'fsdp': 2, 'tensor': 1}, 1 rows x 64 tokens" in out
    for name in ("trainable_params", "frozen_params", "optimizer_state", "temporaries",
                 "peak_estimate", "model FLOPs/step"):
        assert name in out, name
    assert "80 GB device: fits" in out
    assert "0.000001 GB device: does NOT fit" in out


def test_memory_plan_without_a_model_says_to_pass_a_preset():
    run = _memory_plan("--num_devices=2")
    assert run.returncode != 0
    assert "is not here: pass --preset" in run.stderr
