"""LoRA / QLoRA: adapters at init, training (frozen base, optimizer state), merged and PEFT
exports checked in transformers / peft, PEFT adapters made in PyTorch imported, int8 / nf4.

One LoRA run (3 steps on the tiny demo checkpoint) is shared by the export tests.
"""

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax import checkpoint as ckpt
from llava_jax import load_pretrained, sharding, tree
from llava_jax.convert import adapters, jax_to_hf
from llava_jax.models import create_model, get_preset, lora
from llava_jax.training import optim
from llava_jax.training.config import default_config, validate_config
from llava_jax.training.trainer import Trainer
from test_convert import reference_logits, sample_inputs
from test_train import demo_data, flat  # noqa: F401  (demo_data is a fixture)

TOL = 1e-4
LLM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def lora_config(data, base_dir, **lora_fields):
    c = default_config(2)
    c.model.base_dir = base_dir
    c.model.dtype = "float32"
    c.model.remat_policy = "full"  # remat + scanned layers with adapters inside
    c.data.json_paths = (data["stage2_json"],)
    c.data.image_roots = (data["image_root"],)
    c.data.packing = True
    c.data.buckets = (128,)
    c.data.max_length = 128
    c.data.num_epochs = None
    c.data.read_threads = 1
    c.optim.global_batch_size = 4
    c.optim.grad_accum_steps = 2
    c.optim.total_steps = 3
    c.optim.learning_rate = 1e-2  # large, so that 3 steps move the adapters measurably
    c.optim.warmup_ratio = 0.0
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.log.tensorboard = False
    c.distributed = "no"
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.lora.dropout = 0.1
    c.lora.projector_learning_rate = 5e-3
    for key, value in lora_fields.items():
        c.lora[key] = value
    return c


@pytest.fixture(scope="module")
def lora_run(demo_data, tiny_demo_checkpoint, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("lora") / "run"
    trainer = Trainer(lora_config(demo_data, tiny_demo_checkpoint), str(workdir))
    trainer._fresh_state()
    initial = flat(jax.device_get(optim.merge_params(trainer.trainable, trainer.frozen)))
    result = trainer.run()
    return types.SimpleNamespace(workdir=str(workdir), trainer=trainer, initial=initial,
                                 result=result, base=tiny_demo_checkpoint)


@pytest.fixture(scope="module")
def hf_base(lora_run, tmp_path_factory):
    """The LoRA run's base model as a transformers directory."""
    return str(jax_to_hf(lora_run.base, str(tmp_path_factory.mktemp("hf") / "base"),
                         progress=False))


def logits_of(model, ids, pixels):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)))


def run_cli(*args):
    done = subprocess.run([sys.executable, "-m", "llava_jax.convert", *args],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


# ----- the model -----

@pytest.mark.parametrize("scan, dtype", [(True, "float32"), (False, "bfloat16")])
def test_lora_at_init_equals_base_exactly(scan, dtype):
    config = get_preset("tiny", scan_layers=scan, dtype=dtype)
    model = create_model(config, seed=3)
    ids, pixels = sample_inputs(config)
    before = logits_of(model, ids, pixels)
    paths = lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), seed=1)
    assert len(paths) == 7 and all(p.startswith("language_model/layers/") for p in paths)
    params = tree.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    assert np.any(params["language_model/layers/self_attn/q_proj/lora_a"] != 0)
    assert params["language_model/layers/mlp/down_proj/lora_b"].shape == (2, 4, 128)
    np.testing.assert_array_equal(logits_of(model, ids, pixels), before)


def test_targets_that_cannot_work_fail_clearly(demo_data, tiny_demo_checkpoint):  # noqa: F811
    model = create_model(get_preset("tiny"))
    with pytest.raises(ValueError, match="matches no Dense"):
        lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=2.0, targets="no_such_module"))
    with pytest.raises(ValueError, match="LM head and the projector"):
        lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=2.0, targets="lm_head|_proj$"))
    config = lora_config(demo_data, tiny_demo_checkpoint)
    config.lora.rank = 0
    config.lora.base_quantization = "nf4"
    with pytest.raises(ValueError, match=r"config\.lora\.base_quantization"):
        validate_config(config)
    config.lora.rank, config.lora.base_quantization = 4, "nf3"
    with pytest.raises(ValueError, match=r"config\.lora\.base_quantization"):
        validate_config(config)


def test_adapter_shardings_follow_their_kernels():
    mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    spec = lambda path, shape: tuple(sharding.partition_spec(path, shape, mesh))
    layer = "language_model/layers/"
    assert spec(layer + "self_attn/q_proj/lora_a", (2, 128, 8)) == (None, "fsdp", None)
    assert spec(layer + "self_attn/q_proj/lora_b", (2, 8, 128)) == (None, None, "tensor")
    assert spec(layer + "mlp/down_proj/lora_a", (2, 256, 8)) == (None, "tensor", None)
    assert spec(layer + "mlp/down_proj/lora_b", (2, 8, 128)) == (None, None, "fsdp")
    assert spec(layer + "mlp/up_proj/kernel_codes", (2, 64, 256)) == (None, "fsdp", "tensor")


def test_projector_learning_rate_is_its_own():
    c = default_config(2).optim
    c.schedule, c.warmup_ratio, c.grad_clip_norm, c.learning_rate = "constant", 0.0, 0.0, 1e-2
    tx, _ = optim.make_optimizer(c, 10, projector_learning_rate=1e-4)
    params = {"multi_modal_projector": {"w": jnp.ones(3)}, "language_model": {"lora_a": jnp.ones(3)}}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves every weight by ~lr (g / |g|): each group by its own rate.
    np.testing.assert_allclose(updates["multi_modal_projector"]["w"], -1e-4, rtol=1e-4)
    np.testing.assert_allclose(updates["language_model"]["lora_a"], -1e-2, rtol=1e-4)


# ----- training -----

def test_lora_run_trains_only_adapters_and_projector(lora_run):
    setup = lora_run.trainer.setup
    trainable = flat(setup.abstract_trainable)
    assert trainable and all(p.startswith("multi_modal_projector/") or p.endswith(("/lora_a", "/lora_b"))
                             for p in trainable)
    assert len([p for p in trainable if p.endswith("/lora_a")]) == 7
    # Adam's two moments for the trainable leaves only (plus step counts).
    state_paths = [p for p, leaf in flat(setup.abstract_opt).items() if leaf.ndim > 0]
    assert len(state_paths) == 2 * len(trainable)
    assert not any(p.startswith(("language_model", "vision_tower")) and p.endswith("/kernel")
                   for p in (path.split("/", 2)[-1] for path in state_paths))
    assert not any("vision_tower" in p or "embed_tokens" in p for p in state_paths)

    assert lora_run.result["step"] == 3 and np.isfinite(lora_run.result["loss"])
    _, abstract = lora.abstract_lora_params(ckpt.read_config(lora_run.workdir),
                                            ckpt.read_lora_config(lora_run.workdir))
    final = flat(ckpt.load_params(lora_run.workdir, abstract))
    assert set(final) == set(lora_run.initial)
    for path, value in lora_run.initial.items():
        if path in trainable:
            continue
        np.testing.assert_array_equal(final[path], value, err_msg=path)  # frozen: bit-identical
    assert np.abs(final["language_model/layers/mlp/up_proj/lora_b"]).max() > 1e-3
    projector = "multi_modal_projector/linear_1/kernel"
    assert not np.array_equal(final[projector], lora_run.initial[projector])


# ----- export and import -----

def test_merged_export_gives_llava_jax_logits_in_transformers(lora_run, tmp_path):
    out = tmp_path / "merged"
    run_cli("jax-to-hf", "--input", lora_run.workdir, "--output", str(out), "--no-progress")
    merged = load_pretrained(lora_run.workdir)
    unmerged = load_pretrained(lora_run.workdir, merge_lora=False)
    assert isinstance(unmerged.model.language_model.layers.self_attn.q_proj, lora.LoraDense)
    ids, pixels = sample_inputs(merged.config)
    ours = logits_of(merged.model, ids, pixels)
    np.testing.assert_allclose(logits_of(unmerged.model, ids, pixels), ours, atol=1e-5, rtol=0)
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(out).float().eval()
    np.testing.assert_allclose(reference_logits(reference, ids, pixels), ours, atol=TOL, rtol=0)
    base = load_pretrained(lora_run.base)
    assert np.abs(logits_of(base.model, ids, pixels) - ours).max() > 1e-3  # adapters matter


def test_peft_adapter_export_loads_in_peft(lora_run, hf_base, tmp_path):
    import peft

    out = tmp_path / "adapter"
    run_cli("jax-to-hf", "--input", lora_run.workdir, "--output", str(out), "--adapter-only")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    base = transformers.LlavaForConditionalGeneration.from_pretrained(hf_base).float().eval()
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ours = load_pretrained(lora_run.workdir)
    ids, pixels = sample_inputs(ours.config)
    np.testing.assert_allclose(reference_logits(model, ids, pixels),
                               logits_of(ours.model, ids, pixels), atol=TOL, rtol=0)


def test_pytorch_peft_adapter_imports_with_transformers_logits(hf_base, lora_run, tmp_path):
    import peft
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = transformers.LlavaForConditionalGeneration.from_pretrained(hf_base).float()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=LLM_TARGETS,
                             init_lora_weights=False,  # random B: a non-trivial adapter
                             modules_to_save=["multi_modal_projector"])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # a "trained" projector, different from the base's
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    adapter_dir = tmp_path / "peft"
    model.save_pretrained(adapter_dir)
    ids, pixels = sample_inputs(ckpt.read_config(lora_run.base))
    expected = reference_logits(model, ids, pixels)

    out = tmp_path / "imported"
    run_cli("peft-to-jax", "--input", str(adapter_dir), "--base", lora_run.base,
            "--output", str(out))
    imported = load_pretrained(out)
    np.testing.assert_allclose(logits_of(imported.model, ids, pixels), expected, atol=TOL, rtol=0)

    # The original LLaVA's LoRA release: LLaMA-style names, the projector beside it.
    original = tmp_path / "original"
    original.mkdir()
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_tensors = {k.replace("model.language_model.", "model."): v for k, v in tensors.items()
                    if "lora_" in k}
    projector = {k.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0")
                  .replace("model.multi_modal_projector.linear_2", "model.mm_projector.2"): v
                 for k, v in tensors.items() if "multi_modal_projector" in k}
    torch.save(lora_tensors, original / "adapter_model.bin")
    torch.save(projector, original / "non_lora_trainables.bin")
    (original / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    adapters.import_peft_adapter(str(original), lora_run.base, str(tmp_path / "from_original"))
    again = load_pretrained(tmp_path / "from_original")
    np.testing.assert_allclose(logits_of(again.model, ids, pixels), expected, atol=TOL, rtol=0)


def test_adapter_with_trained_lm_head_and_embeddings_round_trips_through_peft(
        demo_data, tiny_demo_checkpoint, hf_base, tmp_path):  # noqa: F811
    """configs/demo.py:lora also trains the LM head and the embeddings: --adapter-only carries
    them as PEFT modules_to_save, PEFT's model gives our logits, and peft-to-jax brings the
    adapter back to the same model. A layer norm trained in every layer has no PEFT form."""
    import peft

    config = lora_config(demo_data, tiny_demo_checkpoint, dropout=0.0)
    config.trainable = (r"(^multi_modal_projector/|/lora_[ab]$"
                        r"|^language_model/(lm_head|embed_tokens)/)")
    workdir = tmp_path / "run"
    Trainer(config, str(workdir)).run()
    ours = load_pretrained(workdir)
    base = load_pretrained(tiny_demo_checkpoint)
    for leaf in ("language_model/lm_head/kernel/value",
                 "language_model/embed_tokens/embedding/value"):
        assert not np.array_equal(flat(nnx.state(ours.model, nnx.Param))[leaf],
                                  flat(nnx.state(base.model, nnx.Param))[leaf])  # trained

    out = tmp_path / "adapter"
    run_cli("jax-to-hf", "--input", str(workdir), "--output", str(out), "--adapter-only")
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(saved) == ["embed_tokens", "lm_head", "multi_modal_projector"]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_base).float().eval()
    model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    ids, pixels = sample_inputs(ours.config)
    expected = logits_of(ours.model, ids, pixels)
    np.testing.assert_allclose(reference_logits(model, ids, pixels), expected, atol=TOL, rtol=0)

    run_cli("peft-to-jax", "--input", str(out), "--base", tiny_demo_checkpoint,
            "--output", str(tmp_path / "imported"))
    imported = load_pretrained(tmp_path / "imported")
    np.testing.assert_allclose(logits_of(imported.model, ids, pixels), expected, atol=TOL, rtol=0)

    norms = tmp_path / "norms"
    config.trainable = r"(^multi_modal_projector/|/lora_[ab]$|/input_layernorm/)"
    config.optim.total_steps = 1
    Trainer(config, str(norms)).run()
    done = subprocess.run([sys.executable, "-m", "llava_jax.convert", "jax-to-hf", "--input",
                           str(norms), "--output", str(tmp_path / "x"), "--adapter-only"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "input_layernorm" in done.stderr
    assert "without --adapter-only" in done.stderr and not (tmp_path / "x").exists()


def test_adapter_only_export_of_a_plain_model_fails_clearly(lora_run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "llava_jax.convert", "jax-to-hf", "--input",
                           lora_run.base, "--output", str(tmp_path / "x"), "--adapter-only"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "holds no LoRA adapters" in done.stderr


# ----- QLoRA -----

@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantization_round_trip_within_the_format_bound(kind):
    kernel = jax.random.normal(jax.random.key(0), (2, 128, 48)) * 0.02
    codes, scale = lora.quantize_kernel(kernel, kind)
    assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert codes.shape == ((2, 128, 48) if kind == "int8" else (2, 64, 48))
    error = np.abs(np.asarray(lora.dequantize_kernel(codes, scale, kind)) - np.asarray(kernel))
    bound = np.asarray(lora.quantization_error_bound(kernel, kind))
    assert np.all(error <= bound * (1 + 1e-4))  # + float32 rounding of x / scale
    assert (error / bound).max() > 0.5  # the bound is the format's, not a loose one


def test_qlora_train_step_loss_matches_the_dequantized_model(demo_data, tiny_demo_checkpoint,
                                                             tmp_path):  # noqa: F811
    def trainer(quantization, name):
        c = lora_config(demo_data, tiny_demo_checkpoint, base_quantization=quantization,
                        dropout=0.0)
        c.optim.grad_accum_steps = 1
        c.model.remat_policy = "none"
        return Trainer(c, str(tmp_path / name))

    quantized, plain = trainer("nf4", "q"), trainer("none", "p")
    quantized._fresh_state()
    frozen = tree.flatten(quantized.frozen)
    assert frozen["language_model/layers/mlp/up_proj/kernel_codes"].dtype == jnp.uint8
    dequantized = {}
    for path, value in frozen.items():
        if path.endswith("/kernel_codes"):
            module = path[:-len("/kernel_codes")]
            dequantized[f"{module}/kernel"] = lora.dequantize_kernel(
                value, frozen[f"{module}/kernel_scale"], "nf4")
        elif not path.endswith("/kernel_scale"):
            dequantized[path] = value
    batch = sharding.global_batch(quantized._next_batch(quantized._dataset()), quantized.mesh)
    results = []
    for setup, frozen_tree in ((quantized.setup, quantized.frozen),
                               (plain.setup, tree.unflatten(dequantized))):
        trainable = jax.tree.map(jnp.copy, quantized.trainable)  # the step donates it
        new, _, metrics = setup.train_step(trainable, frozen_tree,
                                           setup.init_optimizer(trainable), batch)
        results.append((float(metrics["loss"]), flat(jax.device_get(new))))
    (q_loss, q_new), (d_loss, d_new) = results
    np.testing.assert_allclose(q_loss, d_loss, rtol=1e-6)
    for path in q_new:
        np.testing.assert_allclose(q_new[path], d_new[path], rtol=1e-5, atol=1e-7, err_msg=path)
