"""`python -m llava_jax.memory_plan` end to end: the real command on fake CPU devices."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "stage 2, 2 CPU devices, mesh {'data': 1, 'fsdp': 2, 'tensor': 1}, 1 rows x 64" in out
    for name in ("trainable_params", "frozen_params", "optimizer_state", "temporaries",
                 "peak_estimate", "model FLOPs/step", "collectives/step   all-gather"):
        assert name in out, name
    assert "80 GB device: fits (90 % usable)" in out
    assert "0.000001 GB device: does NOT fit" in out


def test_memory_plan_without_a_model_says_to_pass_a_preset():
    run = _memory_plan("--num_devices=2")
    assert run.returncode != 0
    assert "is not here: pass --preset" in run.stderr


def test_tpu_slice_names_resolve_to_topologies_and_memory():
    from llava_jax.training.memory_plan import GIB, tpu_target

    v5p = tpu_target("v5p-8")  # 8 TensorCores = 4 chips
    assert (v5p.topology, v5p.chips, v5p.hbm_bytes_per_chip) == ("v5p:2x2x1", 4, 95 * GIB)
    assert tpu_target("v5litepod-8").topology == "v5e:2x4"
    assert tpu_target("v6e-8").chips == 8
    assert tpu_target("v4-32").topology == "v4:2x2x4"
    assert tpu_target("v5p:2x2x2").chips == 8
    assert v5p.device_memory_bytes(num_devices=4) == 95 * GIB
    assert tpu_target("v4-8").device_memory_bytes(num_devices=8) == 16 * GIB  # per core
    with pytest.raises(ValueError, match="v5p slices here are v5p-8, v5p-16"):
        tpu_target("v5p-6")
    with pytest.raises(ValueError, match="unknown TPU topology 'a100-8'"):
        tpu_target("a100-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="the TPU compiler (pip install -e '.[tpu]') is not installed")
def test_memory_plan_compiles_with_the_tpu_compiler_for_a_slice(tmp_path):
    out = tmp_path / "plan.json"
    run = _memory_plan("--preset=tiny", "--topology=v5p-8", "--rows_per_device=2",
                       "--seq_len=128", f"--json={out}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "v5p-8 (95.0 GiB per device): fits" in run.stdout
    plan = json.loads(out.read_text())
    for key in ("peak_bytes_per_device", "device_memory_bytes", "fits", "attention",
                "params_bytes", "optimizer_bytes", "temporaries_bytes", "compile_seconds",
                "flops_per_device", "collectives"):
        assert key in plan, key
    # FSDP over 4 chips: weights gathered, gradients reduced (hlo_stats.py).
    assert plan["collectives"]["all-gather"] > 0
    assert plan["collectives"]["reduce-scatter"] + plan["collectives"]["all-reduce"] > 0
    assert plan["platform"] == "tpu" and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert plan["attention"] == "splash"  # what auto picks on TPU
    assert plan["fits"] is True and plan["device_memory_bytes"] == 95 * 2**30
    assert 0 < plan["params_bytes"] < plan["peak_bytes_per_device"]


def test_memory_plan_rejects_an_unknown_topology():
    run = _memory_plan("--preset=tiny", "--topology=v9-8")
    assert run.returncode != 0
    assert "unknown TPU topology 'v9-8'" in run.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="the TPU compiler (pip install -e '.[tpu]') is not installed")
def test_a_step_the_tpu_compiler_refuses_is_a_plan_that_does_not_fit(tmp_path):
    # The TPU compiler fails outright when a program's buffers exceed HBM: that is an answer
    # (does not fit, with the compiler's numbers), not a traceback.
    out = tmp_path / "plan.json"
    run = _memory_plan("--preset=tiny", "--topology=v5litepod-8", "--rows_per_device=4096",
                       "--seq_len=2048", f"--json={out}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "does NOT fit: the compiler refused the step: RESOURCE_EXHAUSTED" in run.stdout
    assert "Traceback" not in run.stderr
    plan = json.loads(out.read_text())
    assert plan["fits"] is False and plan["device_memory_bytes"] == 16 * 2**30
    assert plan["temporaries_bytes"] > 16 * 2**30  # the compiler's count, parsed
    assert plan["peak_bytes_per_device"] >= plan["temporaries_bytes"] + plan["optimizer_bytes"]


def test_memory_plan_takes_a_tiled_model_with_its_tile_slots(tmp_path):
    """A LLaVA-NeXT step compiles with the training batch's tiled form: one image at the
    largest pinpoint (base + 2 x 2 tiles) per row by default, or --images_per_row tiles."""
    flops = []
    for tiles, extra in ((5, ()), (10, ("--images_per_row=10",))):
        out = tmp_path / f"{tiles}.json"
        run = _memory_plan("--preset=tiny-next", "--num_devices=2", "--rows_per_device=1",
                           "--seq_len=128", f"--json={out}", *extra)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"{tiles} tile slots per row" in run.stdout
        flops.append(json.loads(out.read_text())["flops_per_device"])
    assert flops[1] > flops[0] > 0  # twice the tiles through the tower
