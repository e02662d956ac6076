"""Trainer: config validation, freezing, resume, NaN stop, SIGTERM, the demo CLI.

Every run uses a tiny random LLaVA on a few dozen demo samples (a few seconds per run).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llava_jax import checkpoint as ckpt
from llava_jax.data.tokenize import IGNORE_INDEX
from llava_jax.training import loss as loss_lib
from llava_jax.training import optim
from llava_jax.training.config import default_config, validate_config
from llava_jax.training.trainer import NonFiniteLossError, Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
               "image_size": 16, "patch_size": 8},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2},
}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The first 40 stage-1 and stage-2 demo records as small JSON files."""
    from llava_jax.data import demo

    prepared = demo.prepare()
    root = tmp_path_factory.mktemp("data")
    out = {"image_root": prepared["image_root"], "tokenizer_dir": prepared["tokenizer_dir"]}
    for key in ("stage1_json", "stage2_json"):
        with open(prepared[key]) as handle:
            records = json.load(handle)[:40]
        out[key] = str(root / os.path.basename(prepared[key]))
        with open(out[key], "w") as handle:
            json.dump(records, handle)
    return out


def tiny_config(data, stage=2, **optim_overrides):
    import ml_collections

    c = default_config(stage)
    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict(TINY_MODEL)
    c.model.vocab_from_tokenizer = True
    c.model.tokenizer_dir = data["tokenizer_dir"]
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.data.json_paths = (data[f"stage{stage}_json"],)
    c.data.image_roots = (data["image_root"],)
    c.data.packing = True
    c.data.buckets = (128,)
    c.data.max_length = 128
    c.data.num_epochs = None
    c.data.read_threads = 1
    c.optim.global_batch_size = 4
    c.optim.total_steps = 4
    c.optim.learning_rate = 1e-3
    c.loss_chunk_size = 48  # exercises the chunked LM head (128 = 2 chunks + padding)
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.distributed = "no"
    for key, value in optim_overrides.items():
        c.optim[key] = value
    return c


def flat(tree):
    from llava_jax.tree import flat_path

    return {flat_path(path): leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----- fast checks -----

@pytest.mark.parametrize("field, value, message", [
    ("optim.learning_rate", 0.0, "optim.learning_rate"),
    ("optim.grad_accum_steps", 3, "optim.global_batch_size"),
    ("optim.schedule", "linear", "optim.schedule"),
    ("model.remat_policy", "some", "model.remat_policy"),
    ("data.aspect", "stretch", "data.aspect"),
    ("stage", 3, "stage"),
    ("lm_head_target_fraction", 1.5, "lm_head_target_fraction"),
])
def test_config_errors_name_the_field(demo_data, field, value, message):
    config = tiny_config(demo_data)
    node, _, leaf = field.rpartition(".")
    (config[node] if node else config)[leaf] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate_config(config)


def test_mesh_that_does_not_fit_names_the_fields(demo_data, tmp_path):
    config = tiny_config(demo_data)
    config.mesh.fsdp, config.mesh.tensor = 2, 1
    with pytest.raises(ValueError, match=r"mesh\.data=1, mesh\.fsdp=2, mesh\.tensor=1"):
        Trainer(config, str(tmp_path))
    config.mesh.fsdp = -1
    config.optim.global_batch_size = 3  # 3 rows over 1 device is fine; 3 processes would not be
    Trainer(config, str(tmp_path))


def test_frozen_parameters_have_no_optimizer_state(demo_data, tmp_path):
    for stage, trained in ((1, {"multi_modal_projector"}),
                           (2, {"multi_modal_projector", "language_model"})):
        trainer = Trainer(tiny_config(demo_data, stage), str(tmp_path / str(stage)))
        assert set(trainer.setup.abstract_trainable) == trained
        assert "vision_tower" in trainer.setup.abstract_frozen
        state_paths = [p for p in flat(trainer.setup.abstract_opt)]
        assert state_paths
        assert not any("vision_tower" in p for p in state_paths)
        if stage == 1:
            assert not any("language_model" in p for p in state_paths)
        # Adam's two moments: exactly two state leaves per trainable parameter (+ counts).
        num_trainable = len(jax.tree.leaves(trainer.setup.abstract_trainable))
        moment_leaves = [p for p in state_paths if any(part in trained for part in p.split("/"))]
        assert len(moment_leaves) == 2 * num_trainable


def test_weight_decay_mask_skips_biases_and_norms():
    params = {"a": {"kernel": 1, "bias": 2}, "norm": {"scale": 3}}
    assert optim.decay_mask(params) == {"a": {"kernel": True, "bias": False},
                                        "norm": {"scale": False}}


def test_chunked_loss_matches_unchunked():
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    hidden = jax.random.normal(key, (2, 10, 8))
    weight = jax.random.normal(jax.random.PRNGKey(1), (8, 13))
    targets = jnp.array(np.random.RandomState(0).randint(-1, 13, (2, 10)))
    targets = jnp.where(targets < 0, IGNORE_INDEX, targets)
    logits_fn = lambda h: h @ weight
    full = loss_lib.chunked_cross_entropy(logits_fn, hidden, targets, 0)
    chunked = loss_lib.chunked_cross_entropy(logits_fn, hidden, targets, 3)
    logits = hidden @ weight
    valid = targets != IGNORE_INDEX
    reference = -jnp.sum(jnp.where(valid, jnp.take_along_axis(
        jax.nn.log_softmax(logits), jnp.where(valid, targets, 0)[..., None], -1)[..., 0], 0))
    np.testing.assert_allclose(full, reference, rtol=1e-5)
    np.testing.assert_allclose(chunked, reference, rtol=1e-5)


@pytest.mark.parametrize("row1_targets", [7, 12])  # capacity 8 of 16: fits / row 1 too many
def test_lm_head_on_targets_only_gives_the_same_loss_and_grads(row1_targets):
    import jax.numpy as jnp

    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(2, 16, 8), jnp.float32)
    weight = jnp.asarray(rng.randn(8, 13), jnp.float32)
    targets = np.full((2, 16), IGNORE_INDEX, np.int32)
    targets[0, [2, 9, 15]] = [4, 0, 12]
    row = rng.choice(16, row1_targets, replace=False)
    targets[1, row] = rng.randint(0, 13, row.size)
    calls = []

    def loss(hidden, weight, fraction):
        def logits_fn(h):
            calls.append(h.shape)
            return h @ weight
        return loss_lib.target_loss_sum(logits_fn, hidden, jnp.asarray(targets), chunk_size=0,
                                     target_fraction=fraction)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (full, full_grads), (picked, picked_grads) = grad(hidden, weight, 0.0), grad(hidden, weight, 0.5)
    np.testing.assert_allclose(picked, full, rtol=1e-6)
    for a, b in zip(picked_grads, full_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (2, 8, 8) in calls  # the gathered branch exists: 8 = ceil(0.5 * 16) target slots
    # Non-target positions get no gradient through the LM head.
    no_target = np.asarray(targets) == IGNORE_INDEX
    assert np.all(np.asarray(picked_grads[0])[no_target] == 0)


# ----- training runs -----

def test_resume_equals_uninterrupted_run(demo_data, tmp_path):
    straight = Trainer(tiny_config(demo_data), str(tmp_path / "straight"))
    straight_result = straight.run()
    assert straight_result["step"] == 4

    config = tiny_config(demo_data)
    config.max_steps = 3  # stop at 3 (saves a checkpoint), then a new process-like run resumes
    first = Trainer(config, str(tmp_path / "resumed")).run()
    assert first["step"] == 3 and first["stopped"] == "max_steps"
    config.max_steps = -1
    resumed = Trainer(config, str(tmp_path / "resumed"))
    result = resumed.run()
    assert result["step"] == 4
    a = flat(optim.merge_params(straight.trainable, straight.frozen))
    b = flat(optim.merge_params(resumed.trainable, resumed.frozen))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert straight_result["history"][-1] == result["history"][-1]
    # The workdir is a model directory for inference and conversion.
    loaded = ckpt.load_pretrained(tmp_path / "resumed")
    np.testing.assert_array_equal(
        np.asarray(loaded.model.multi_modal_projector.linear_1.kernel[...]),
        a["multi_modal_projector/linear_1/kernel"])
    assert loaded.tokenizer is not None
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [3, 4]  # max_to_keep=2


def test_frozen_parameters_unchanged_stage1_then_stage2(demo_data, tmp_path):
    from safetensors.numpy import load_file

    stage1 = Trainer(tiny_config(demo_data, stage=1, total_steps=2), str(tmp_path / "s1"))
    init = flat(stage1.setup.abstract)  # shapes only; the real initial values come from _fresh_state
    stage1._fresh_state()
    initial = flat(optim.merge_params(stage1.trainable, stage1.frozen))
    assert set(initial) == set(init)
    stage1.run()
    after1 = flat(optim.merge_params(stage1.trainable, stage1.frozen))
    for name, value in initial.items():
        if name.startswith("multi_modal_projector"):
            assert not np.array_equal(value, after1[name]), f"{name} did not train"
        else:
            np.testing.assert_array_equal(value, after1[name], err_msg=name)
    exported = load_file(tmp_path / "s1" / "projector" / "mm_projector.safetensors")
    assert sorted(exported) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    np.testing.assert_array_equal(exported["model.mm_projector.0.weight"],
                                  after1["multi_modal_projector/linear_1/kernel"].T)

    config2 = tiny_config(demo_data, stage=2, total_steps=2)
    config2.model.preset, config2.model.tokenizer_dir = "", ""
    config2.model.base_dir = str(tmp_path / "s1")
    config2.model.projector = str(tmp_path / "s1" / "projector" / "mm_projector.safetensors")
    stage2 = Trainer(config2, str(tmp_path / "s2"))
    stage2._fresh_state()
    start2 = flat(optim.merge_params(stage2.trainable, stage2.frozen))
    for name, value in after1.items():  # stage 2 starts exactly where stage 1 ended
        np.testing.assert_array_equal(value, start2[name], err_msg=name)
    stage2.run()
    after2 = flat(optim.merge_params(stage2.trainable, stage2.frozen))
    for name, value in after1.items():
        changed = not np.array_equal(value, after2[name])
        assert changed == (not name.startswith("vision_tower")), name


def test_nan_loss_stops_with_last_good_checkpoint(demo_data, tmp_path):
    # Warm-up makes step 1's learning rate 0 (saved, good); step 2's 1e38 overflows.
    config = tiny_config(demo_data, learning_rate=1e38, warmup_ratio=0.25)
    config.checkpoint.every_steps = 1
    trainer = Trainer(config, str(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"step 2.*last checkpoint \(step 1\)"):
        trainer.run()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]
    restored = ckpt.load_pretrained(tmp_path)
    leaves = jax.tree.leaves(flat(nnx_params(restored.model)))
    assert all(np.isfinite(leaf).all() for leaf in leaves)


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _cli(workdir, *overrides, config="configs/demo.py"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return [sys.executable, "-m", "llava_jax.train", f"--config={config}",
            f"--workdir={workdir}", *overrides], env


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    command, env = _cli(tmp_path, "--config.stage1.optim.total_steps=1000",
                        "--config.stage1.log.every_steps=1", "--config.stage1.data.num_epochs=100")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    deadline = time.time() + 300
    for line in process.stdout:  # wait until training is under way
        output.append(line)
        if "step 2/1000" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    log = "".join(output) + rest
    assert process.returncode == 143, log[-3000:]
    assert "SIGTERM" in log
    steps = [int(p.name) for p in (tmp_path / "stage1" / "checkpoints").iterdir()
             if p.name.isdigit()]
    assert steps and max(steps) >= 2
    assert not any("tmp" in p.name for p in (tmp_path / "stage1" / "checkpoints").iterdir())
    meta = json.loads((tmp_path / "stage1" / "checkpoints" / str(max(steps)) / "meta" /
                       "metadata").read_text())
    assert meta["step"] == max(steps)
    ckpt.load_pretrained(tmp_path / "stage1")


def test_demo_cli_end_to_end(tmp_path):
    command, env = _cli(tmp_path, "--config.stage1.optim.total_steps=2",
                        "--config.stage2.optim.total_steps=3", "--config.eval.limit=6",
                        "--config.eval.batch_size=6")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["num_examples"] == 6 and 0.0 <= results["accuracy"] <= 1.0
    assert f'"num_examples": 6' in done.stdout
    assert (tmp_path / "stage1" / "projector" / "mm_projector.safetensors").exists()
    assert list((tmp_path / "stage2" / "tensorboard").iterdir())
    model = ckpt.load_pretrained(tmp_path / "stage2")
    assert model.config.text.vocab_size == len(model.tokenizer)


def _load_demo_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_demo_config_generates_data_on_first_use_not_on_load(tmp_path, monkeypatch):
    from llava_jax.training import state

    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAVA_JAX_CACHE", str(cache))
    config = _load_demo_config()
    assert not cache.exists()  # loading the config wrote nothing
    assert config.stage1.data.json_paths[0].startswith(str(cache))
    assert config.eval.file.startswith(str(cache))
    calls = []
    monkeypatch.setattr(state.demo, "prepare", lambda *a, **k: calls.append(a) or {})
    state.prepare_builtin_data(config.stage1)
    assert len(calls) == 1
    with config.stage1.unlocked():
        config.stage1.data.builtin = ""
    state.prepare_builtin_data(config.stage1)
    assert len(calls) == 1


def test_unknown_builtin_data_is_a_config_error(demo_data):
    config = tiny_config(demo_data)
    config.data.builtin = "imagenet"
    with pytest.raises(ValueError, match="data.builtin"):
        validate_config(config)
