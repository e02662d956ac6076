"""Hardware presets: configs/{pretrain,finetune}.py:SIZE,TARGET keep LLaVA's global batch."""

import importlib.util
from pathlib import Path

import pytest

from llava_jax.training import targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _get_config(name: str, arg: str | None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_target_has_a_preset():
    for target in targets.TARGETS:
        assert any(t == target for _, _, t in targets.ROWS_PER_DEVICE), target


@pytest.mark.parametrize("key", sorted(targets.ROWS_PER_DEVICE))
def test_preset_keeps_the_global_batch(key):
    size, stage, target = key
    config = _get_config("finetune" if stage == 2 else "pretrain", f"{size},{target}")
    rows = targets.ROWS_PER_DEVICE[key]
    devices = targets.TARGETS[target].devices
    assert config.optim.global_batch_size == (128 if stage == 2 else 256)
    assert config.optim.grad_accum_steps * rows * devices == config.optim.global_batch_size
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, -1, 1)
    assert rows & (rows - 1) == 0  # a power of two


def test_plain_size_is_unchanged():
    config = _get_config("finetune", "13b")
    assert config.optim.grad_accum_steps == 1 and config.optim.global_batch_size == 128


@pytest.mark.parametrize("arg, message", [
    ("7b,v9x-8", "unknown hardware target"),
    ("30b", "use SIZE or SIZE,TARGET"),
])
def test_bad_arguments_are_clear_errors(arg, message):
    with pytest.raises(ValueError, match=message):
        _get_config("finetune", arg)


def test_a_pair_that_does_not_fit_says_so():
    missing = [(size, stage, target) for size in ("7b", "13b") for stage in (1, 2)
               for target in targets.TARGETS if (size, stage, target) not in targets.ROWS_PER_DEVICE]
    if not missing:
        pytest.skip("every pair fits")
    size, stage, target = missing[0]
    with pytest.raises(ValueError, match="does not fit"):
        _get_config("finetune" if stage == 2 else "pretrain", f"{size},{target}")
