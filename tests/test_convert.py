"""Checkpoint conversion: round trips, the original LLaVA layout, bad input, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file as torch_save_file

from llava_jax import checkpoint, load_pretrained
from llava_jax.convert import CheckpointError, hf_config, hf_to_jax, jax_to_hf, llava_to_jax
from llava_jax.models import create_model, get_preset

TOL = 1e-4


def tiny_hf_config(**text_changes):
    config = hf_config.to_hf_llava(get_preset("tiny"))
    config["text_config"].update(text_changes)
    return transformers.LlavaConfig.from_dict(config)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-written LLaVA directory with random weights, in 3 shards."""
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(tiny_hf_config()).float().eval()
    path = tmp_path_factory.mktemp("hf") / "llava-tiny"
    model.save_pretrained(path, max_shard_size="600KB")
    return path


def read_all(directory: Path) -> dict:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def reference_logits(model, ids, pixels=None):
    with torch.no_grad():
        kwargs = {"input_ids": torch.from_numpy(ids).long()}
        if pixels is not None:
            kwargs["pixel_values"] = torch.from_numpy(pixels.reshape(-1, *pixels.shape[2:]).transpose(0, 3, 1, 2).copy())
        return model(**kwargs).logits.numpy()


def sample_inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    image = [config.image_token_index] * config.num_image_tokens
    ids = np.array([[1, *rng.integers(3, 500, 3), *image, *rng.integers(3, 500, 4)]], np.int32)
    pixels = rng.standard_normal((1, 1, 32, 32, 3)).astype(np.float32)
    return ids, pixels


def test_hf_round_trip_is_bit_identical_and_loads_cleanly(hf_dir, tmp_path):
    assert len(list(hf_dir.glob("*.safetensors"))) >= 3  # really sharded, with an index
    hf_to_jax(str(hf_dir), str(tmp_path / "jax"), progress=False)
    jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "hf"), progress=False, max_shard_bytes=500_000)
    original, converted = read_all(hf_dir), read_all(tmp_path / "hf")
    canonical = lambda k: k.replace("vision_tower.vision_model.", "vision_tower.")
    assert sorted(map(canonical, converted)) == sorted(map(canonical, original))
    for name, tensor in converted.items():
        assert torch.equal(tensor, original[canonical(name)]), name
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys


def test_hf_to_jax_logits_match_transformers(hf_dir, tmp_path):
    hf_to_jax(str(hf_dir), str(tmp_path / "jax"), progress=False)
    loaded = load_pretrained(tmp_path / "jax")
    assert loaded.tokenizer is None  # the random HF dir has no tokenizer files
    ids, pixels = sample_inputs(loaded.config)
    ours = np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(pixels)))
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir).float().eval()
    np.testing.assert_allclose(ours, reference_logits(reference, ids, pixels), atol=TOL, rtol=0)
    text_only = ids[:, :4]
    np.testing.assert_allclose(np.asarray(loaded.model(jnp.asarray(text_only))),
                               reference_logits(reference, text_only), atol=TOL, rtol=0)


def test_newer_key_layout_and_bfloat16(hf_dir, tmp_path):
    """`model.language_model.*` names (transformers' module names) and a bf16 round trip."""
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((hf_dir / "config.json").read_text())
    mapping = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
               "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
    tensors = {}
    for name, tensor in read_all(hf_dir).items():
        prefix = next(p for p in mapping if name.startswith(p))
        tensors[mapping[prefix] + name[len(prefix):]] = tensor.to(torch.bfloat16)
    torch_save_file(tensors, str(renamed / "model.safetensors"))
    hf_to_jax(str(renamed), str(tmp_path / "jax"), dtype="bfloat16", progress=False)
    assert checkpoint.read_config(tmp_path / "jax").param_dtype == "bfloat16"
    jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "hf"), progress=False)
    back = read_all(tmp_path / "hf")
    assert all(t.dtype == torch.bfloat16 for t in back.values())
    for name, tensor in tensors.items():
        canonical = name.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower.vision_model.").replace(
            "model.multi_modal_projector.", "multi_modal_projector.")
        canonical = "language_model.lm_head.weight" if canonical == "lm_head.weight" else canonical
        assert torch.equal(back[canonical], tensor), name


# ----- the original LLaVA layout -----

def write_original_llava(tmp_path, *, with_projector=True, tied=False, fmt="bin"):
    """A random LlavaLlamaForCausalLM dir (original key names) + a CLIPVisionModel dir."""
    torch.manual_seed(1)
    base = get_preset("tiny")
    text = base.text
    llama_config = transformers.LlamaConfig(
        vocab_size=448, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=tied)
    llama = transformers.LlamaForCausalLM(llama_config).float()
    state = {k: v.contiguous() for k, v in llama.state_dict().items()}
    if tied:
        state.pop("lm_head.weight")
    projector = {}
    if with_projector:
        proj = torch.nn.Sequential(torch.nn.Linear(64, text.hidden_size), torch.nn.GELU(),
                                   torch.nn.Linear(text.hidden_size, text.hidden_size))
        projector = {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    llava_dir = tmp_path / "llava"
    llava_dir.mkdir()
    config = llama_config.to_dict()
    config.update(model_type="llava_llama", mm_vision_tower="openai/clip-tiny",
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=64, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad",
                  mm_patch_merge_type="flat", architectures=["LlavaLlamaForCausalLM"])
    if not with_projector:
        config["model_type"] = "llama"
    (llava_dir / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save({**state, **projector}, llava_dir / "pytorch_model.bin")
    else:
        torch_save_file({**state, **projector}, str(llava_dir / "model.safetensors"))
    clip_config = transformers.CLIPVisionConfig(**hf_config.to_hf_llava(base)["vision_config"])
    clip = transformers.CLIPVisionModel(clip_config).float()
    clip.save_pretrained(tmp_path / "clip")
    return llava_dir, tmp_path / "clip", state, projector, clip


@pytest.mark.parametrize("fmt,tied", [("bin", False), ("safetensors", True)])
def test_llava_to_jax_matches_transformers_with_the_same_weights(tmp_path, fmt, tied):
    llava_dir, clip_dir, state, projector, clip = write_original_llava(tmp_path, tied=tied, fmt=fmt)
    out = llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "jax"), progress=False)
    loaded = load_pretrained(out)
    config = loaded.config
    # <image> and <pad> appended after the 448 original rows, padded to a multiple of 64.
    assert (config.image_token_index, config.pad_token_id, config.text.vocab_size) == (448, 449, 512)
    assert config.vision_feature_layer == -2 and config.image_aspect == "pad"
    assert not config.text.tie_word_embeddings  # a tied original gets a cloned head, as HF does

    # Reference: transformers' LLaVA holding the original tensors + our 64 new rows.
    hf_json = hf_config.to_hf_llava(config)
    reference = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(hf_json)).float().eval()
    embed = np.asarray(loaded.model.language_model.embed_tokens.embedding[...])
    head = np.asarray(loaded.model.language_model.lm_head.kernel[...]).T
    original_head = state.get("lm_head.weight", state["model.embed_tokens.weight"]).numpy()
    np.testing.assert_array_equal(embed[:448], state["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(head[:448], original_head)
    new_rows = embed[448:]
    assert np.abs(new_rows - embed[:448].mean(0)).max() < 0.05  # N(mean, 1e-5 cov) samples
    module_state = {"model.language_model." + k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    module_state["model.language_model.embed_tokens.weight"] = torch.from_numpy(embed.copy())
    module_state["lm_head.weight"] = torch.from_numpy(head.copy())
    module_state.update({f"model.multi_modal_projector.linear_{1 if k.split('.')[2] == '0' else 2}.{k.split('.')[-1]}": v
                         for k, v in projector.items()})
    module_state.update({"model.vision_tower." + k.removeprefix("vision_model."): v
                         for k, v in clip.state_dict().items()})
    missing, unexpected = reference.load_state_dict(module_state, strict=False)
    assert not [m for m in missing if "position_ids" not in m] and not unexpected, (missing, unexpected)
    ids, pixels = sample_inputs(config)
    np.testing.assert_allclose(np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(pixels))),
                               reference_logits(reference, ids, pixels), atol=TOL, rtol=0)


def test_stage1_projector_onto_plain_llama(tmp_path):
    llava_dir, clip_dir, _, projector, _ = write_original_llava(tmp_path, with_projector=False)
    projector_file = tmp_path / "mm_projector.bin"
    proj = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, projector_file)
    with pytest.raises(CheckpointError, match="--projector"):
        llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "no"), progress=False)
    out = llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "jax"),
                       projector=str(projector_file), progress=False)
    loaded = load_pretrained(out)
    assert loaded.config.projector_type == "mlp2x_gelu" and loaded.config.vision_feature_layer == -2
    np.testing.assert_array_equal(np.asarray(loaded.model.multi_modal_projector.linear_2.kernel[...]),
                                  proj[2].weight.detach().numpy().T)


def test_init_projector_builds_a_stage1_start_from_plain_llama(tmp_path):
    llava_dir, clip_dir, state, _, _ = write_original_llava(tmp_path, with_projector=False)
    out = llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "jax"),
                       init_projector="mlp2x_gelu", progress=False)
    loaded = load_pretrained(out)
    assert loaded.config.projector_type == "mlp2x_gelu"
    kernel = np.asarray(loaded.model.multi_modal_projector.linear_1.kernel[...])
    assert kernel.shape == (64, 128) and 0 < np.abs(kernel).max() <= 1 / np.sqrt(64)
    np.testing.assert_array_equal(np.asarray(loaded.model.language_model.norm.scale[...]),
                                  state["model.norm.weight"].numpy())
    with pytest.raises(ValueError, match="not both"):
        llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "x"), projector="p.bin",
                     init_projector="mlp2x_gelu", progress=False)


def test_llava_to_jax_adds_image_and_pad_tokens_to_the_tokenizer(tmp_path, llama_tokenizer_path):
    import shutil

    torch.manual_seed(2)
    llava_dir, clip_dir, state, _, _ = write_original_llava(tmp_path)
    # A 32000-token vocabulary to go with the real tokenizer: resize the embeddings.
    state = dict(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.randn(32000, 128) * 0.02
    torch.save(state | torch.load(llava_dir / "pytorch_model.bin", weights_only=True) | {
        n: state[n] for n in ("model.embed_tokens.weight", "lm_head.weight")}, llava_dir / "pytorch_model.bin")
    config = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    shutil.copy(llama_tokenizer_path, llava_dir / "tokenizer.json")
    shutil.copy(llama_tokenizer_path.parent / "tokenizer_config.json", llava_dir / "tokenizer_config.json")
    out = llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "jax"), progress=False)
    loaded = load_pretrained(out)
    assert loaded.config.text.vocab_size == 32064
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == 32000 == loaded.config.image_token_index
    assert loaded.tokenizer.convert_tokens_to_ids("<pad>") == 32001 == loaded.config.pad_token_id
    assert loaded.tokenizer("USER: <image>\nHi").input_ids[:5] == [1, 3148, 1001, 29901, 29871]


# ----- bad input -----

def test_missing_input_and_unknown_model_type(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match="config.json not found"):
        hf_to_jax(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(hf_config.ConfigError, match="qwen2_vl"):
        hf_to_jax(str(bad), str(tmp_path / "out"), progress=False)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        hf_to_jax(str(bad), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def copy_with(hf_dir, target, edit):
    target.mkdir()
    (target / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = edit(read_all(hf_dir))
    torch_save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda t: {k: v for k, v in t.items() if k != "language_model.model.norm.weight"},
     r"1 missing tensors: \['language_model.model.norm.weight'\]"),
    (lambda t: {**t, "language_model.model.extra.weight": torch.zeros(2)},
     r"unexpected tensors: \['.*model.safetensors:language_model.model.extra.weight'\]"),
    (lambda t: {**t, "multi_modal_projector.linear_1.weight": torch.zeros(128, 65)},
     r"model.safetensors:multi_modal_projector.linear_1.weight: shape \(128, 65\) .*expected \(128, 64\)"),
], ids=["missing", "unexpected", "misshaped"])
def test_tensor_mismatches_name_file_and_key(hf_dir, tmp_path, edit, message):
    source = copy_with(hf_dir, tmp_path / "in", edit)
    with pytest.raises(CheckpointError, match=message):
        hf_to_jax(str(source), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_dtype_overflow_is_an_error(hf_dir, tmp_path):
    def big(tensors):
        tensors["language_model.model.norm.weight"] = torch.full((128,), 1e6)
        return tensors

    source = copy_with(hf_dir, tmp_path / "in", big)
    with pytest.raises(CheckpointError, match="norm.weight.*overflows float16"):
        hf_to_jax(str(source), str(tmp_path / "out"), dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_no_complete_looking_output(hf_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original_add = checkpoint.ModelWriter.add

    def flaky_add(self, path, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original_add(self, path, array)

    monkeypatch.setattr(checkpoint.ModelWriter, "add", flaky_add)
    with pytest.raises(KeyboardInterrupt):
        hf_to_jax(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(checkpoint.CheckpointNotFoundError):
        load_pretrained(tmp_path / "out")


def test_existing_output_is_never_overwritten_by_default(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_jax(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


# ----- the CLI -----

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llava_jax.convert", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli_round_trip_and_errors(hf_dir, tmp_path):
    result = run_cli("hf-to-jax", "--input", str(hf_dir), "--output", str(tmp_path / "jax"))
    assert result.returncode == 0, result.stderr
    assert "tensors: 100%" in result.stderr  # progress bar
    result = run_cli("jax-to-hf", "--input", str(tmp_path / "jax"), "--output", str(tmp_path / "hf"),
                     "--dtype", "bfloat16", "--no-progress")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["torch_dtype"] == "bfloat16"
    result = run_cli("hf-to-jax", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "error:" in result.stderr and "config.json not found" in result.stderr


def test_unsupported_rope_scaling_is_a_clear_error(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(hf_config.ConfigError, match="rope scaling type 'yarn' is not supported"):
        hf_config.from_hf_llava(config)
    config["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    assert hf_config.from_hf_llava(config).text.rope_scaling_factor == 2.0


def test_load_pretrained_dtype_and_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = create_model(get_preset("tiny"), seed=3)
    vocab = {f"w{i}": i for i in range(40)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0")
    checkpoint.save_model(model, tmp_path / "m", tokenizer=tokenizer)
    loaded = load_pretrained(tmp_path / "m", dtype=jnp.bfloat16)
    assert loaded.config.dtype == loaded.config.param_dtype == "bfloat16"
    assert loaded.model.language_model.norm.scale[...].dtype == jnp.bfloat16
    assert loaded.tokenizer("w3 w5").input_ids == [3, 5]
    ids = jnp.asarray([[1, 2, 3]], jnp.int32)
    logits = loaded.model(ids)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids)), atol=0.05)
