"""The original LLaVA-1.6 layout (liuhaotian llava-v1.6-*: LlavaLlamaForCausalLM /
LlavaMistralForCausalLM with image_aspect_ratio 'anyres', image_grid_pinpoints,
mm_patch_merge_type 'spatial_unpad' and model.image_newline) through `llava-to-jax`, against
transformers' LlavaNextForConditionalGeneration holding the same tensors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer

from llava_jax import load_pretrained
from llava_jax.convert import hf_config
from test_convert_anyres import PHOTOS, family

TOL = 1e-4


def without_image_tokens(tokenizer, directory):
    """The tokenizer as the original release ships it: no <image>, no <pad> (conversion adds
    them at the end of the vocabulary, where the test tokenizer has them)."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    dropped = {"<image>", "<pad>"}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in dropped]
    for token in dropped:
        data["model"]["vocab"].pop(token, None)
    plain = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
        eos_token="</s>", unk_token="<unk>")
    assert len(plain) == len(tokenizer) - 2
    plain.save_pretrained(directory)
    return len(plain)


def convert_with_cli(llava_dir, tower_dir, output):
    """`llava-to-jax` as a user runs it; the loaded result."""
    done = subprocess.run([sys.executable, "-m", "llava_jax.convert", "llava-to-jax", "--input",
                           str(llava_dir), "--vision-tower", str(tower_dir), "--output",
                           str(output), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_pretrained(output)


def save_original_state(state, path, with_tower):
    """transformers 5 LLaVA-NeXT / OneVision tensors under the original LLaVA key names
    (model.mm_projector.{0,2}, model.*, model.image_newline; the tower, when kept, under
    model.vision_tower.vision_tower.vision_model.*, which transformers 5 writes without
    `vision_model.`) as one safetensors file."""
    from safetensors.torch import save_file

    original = {}
    for key, value in state.items():
        if key.startswith("model.vision_tower."):
            if with_tower:
                original["model.vision_tower.vision_tower.vision_model." +
                         key[len("model.vision_tower."):]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = 0 if ".linear_1." in key else 2
            original[f"model.mm_projector.{index}.{key.rsplit('.', 1)[-1]}"] = value
        elif key.startswith("model.language_model."):
            original["model." + key[len("model.language_model."):]] = value
        else:  # lm_head.weight, model.image_newline
            original[key] = value
    assert "model.image_newline" in original
    save_file(original, str(path))


def write_original_next(tmp_path, decoder, tuned_tower=False):
    """A random LLaVA-NeXT in the original v1.6 layout + its CLIP tower directory.
    tuned_tower: the checkpoint holds the tower (unfreeze_mm_vision_tower, as the released
    v1.6 models do) and the CLIP directory another, untuned one."""
    config, _, tokenizer, processor = family("next")
    llava_dir = tmp_path / "llava-v1.6"
    llava_dir.mkdir()
    vocab = without_image_tokens(tokenizer, llava_dir)
    text = config.text_config.to_dict()
    text.update(vocab_size=vocab, pad_token_id=None)  # the original has no <pad>
    if decoder == "mistral":  # a window shorter than the photo rows' sequences
        text = transformers.MistralConfig(**{k: text[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "pad_token_id")}, sliding_window=48).to_dict()
        config.text_config = transformers.MistralConfig(**text)
    else:
        config.text_config = transformers.LlamaConfig(**text)
    torch.manual_seed(3)
    model = transformers.LlavaNextForConditionalGeneration(config).float().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_original_state(state, llava_dir / "model.safetensors", with_tower=tuned_tower)
    fields = dict(text, model_type="llava_llama" if decoder == "llama" else "llava_mistral",
                  architectures=["LlavaLlamaForCausalLM" if decoder == "llama" else
                                 "LlavaMistralForCausalLM"],
                  mm_vision_tower="openai/clip-tiny", mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=config.vision_config.hidden_size, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="anyres",
                  image_grid_pinpoints=config.image_grid_pinpoints,
                  mm_patch_merge_type="spatial_unpad", unfreeze_mm_vision_tower=tuned_tower)
    (llava_dir / "config.json").write_text(json.dumps(fields))
    clip = transformers.CLIPVisionModel(config.vision_config).float()
    if not tuned_tower:
        clip.load_state_dict({k[len("model.vision_tower."):]: v for k, v in state.items()
                              if k.startswith("model.vision_tower.")})
    clip.save_pretrained(tmp_path / "clip")
    return llava_dir, tmp_path / "clip", state, processor, vocab


@pytest.mark.parametrize("decoder, tuned_tower", [("llama", False), ("mistral", False),
                                                  ("llama", True)])
def test_original_v16_directory_gives_transformers_logits(tmp_path, decoder, tuned_tower):
    llava_dir, clip_dir, state, processor, vocab = write_original_next(tmp_path, decoder,
                                                                       tuned_tower)
    loaded = convert_with_cli(llava_dir, clip_dir, tmp_path / "jax")
    config = loaded.config
    assert config.anyres and config.image_aspect == "anyres"
    assert config.mm_patch_merge_type == "spatial_unpad" and config.text.model_type == decoder
    assert [list(p) for p in config.image_grid_pinpoints] == json.loads(
        (llava_dir / "config.json").read_text())["image_grid_pinpoints"]
    assert config.image_token_index == vocab and config.text.vocab_size % 64 == 0
    np.testing.assert_array_equal(np.asarray(loaded.model.image_newline[...]),
                                  state["model.image_newline"].numpy())

    # transformers' LLaVA-NeXT holding the original tensors + the converter's new vocab rows.
    reference = transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig.from_dict(hf_config.to_hf_llava(config))).float().eval()
    embed = np.asarray(loaded.model.language_model.embed_tokens.embedding[...])
    head = np.asarray(loaded.model.language_model.lm_head.kernel[...]).T
    np.testing.assert_array_equal(embed[:vocab],
                                  state["model.language_model.embed_tokens.weight"].numpy())
    state = dict(state)
    state["model.language_model.embed_tokens.weight"] = torch.from_numpy(embed.copy())
    state["lm_head.weight"] = torch.from_numpy(head.copy())
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    photos = [Image.fromarray(load()) for load in PHOTOS[:3]]
    texts = ["USER: <image>\nWhat is in the image? ASSISTANT:",
             "<image> one, <image> two: which is the cat?", "A row with no image at all."]
    rows = [[photos[0]], [photos[1], photos[2]], []]  # a wide, a square, a tall photo
    ours = loaded.processor(text=texts, images=rows)
    theirs = processor(text=texts, images=[p for row in rows for p in row], padding=True,
                       return_tensors="pt")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"].numpy())
    if decoder == "mistral":  # the window really cuts: rows longer than it
        assert ours["input_ids"].shape[1] > 2 * config.text.sliding_window
    logits = np.asarray(loaded.model(**ours))
    with torch.no_grad():
        expected = reference(**theirs).logits.numpy()
    real = ours["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("change, field", [
    (dict(mm_patch_merge_type="flat"), "mm_patch_merge_type"),
    (dict(mm_patch_merge_type="spatial"), "mm_patch_merge_type"),
    (dict(image_aspect_ratio="anyres_max_9"), "image_aspect_ratio"),
    (dict(image_grid_pinpoints="(1x1),(2x2)"), "image_grid_pinpoints"),
    (dict(image_aspect_ratio="pad", mm_patch_merge_type="spatial_unpad"), "mm_patch_merge_type"),
    (dict(model_type="llava_qwen", image_aspect_ratio="anyres_max_9",
          mm_newline_position="one_token"), "mm_newline_position"),
])
def test_unsupported_original_v16_values_fail_naming_the_field(change, field):
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                  num_attention_heads=4, mm_projector_type="mlp2x_gelu",
                  image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                  image_grid_pinpoints=[[28, 56], [56, 28]])
    fields.update(change)
    clip = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=80,
                                         num_hidden_layers=2, num_attention_heads=3,
                                         image_size=28, patch_size=7).to_dict()
    with pytest.raises(hf_config.ConfigError, match=field):
        hf_config.from_original_llava(fields, clip, vocab_size=128, image_token_index=100,
                                      pad_token_id=101)


def write_original_onevision(tmp_path, model_type, pinpoints):
    """A random LLaVA-OneVision in lmms-lab's layout (LlavaQwenForCausalLM: the trained SigLIP,
    one layer short of the released tower, inside the checkpoint; a tokenizer without
    <image>) + a SigLIP directory one layer deeper, with a pooling head, as released."""
    config, _, tokenizer, processor = family("onevision")
    llava_dir = tmp_path / "llava-onevision"
    llava_dir.mkdir()
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"]
                            if t["content"] not in ("<image>", "<pad>")]
    for token in ("<image>", "<pad>"):
        data["model"]["vocab"].pop(token, None)
    plain = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>",
        pad_token="<|endoftext|>")
    plain.save_pretrained(llava_dir)
    torch.manual_seed(5)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).float().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_original_state(state, llava_dir / "model.safetensors", with_tower=True)
    text = config.text_config.to_dict()
    fields = dict(text, model_type=model_type, architectures=["LlavaQwenForCausalLM"],
                  mm_vision_tower="google/siglip-tiny", mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=config.vision_config.hidden_size, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="anyres_max_2",
                  image_grid_pinpoints=pinpoints, mm_patch_merge_type="spatial_unpad",
                  mm_newline_position="grid", mm_spatial_pool_mode="bilinear",
                  mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model")
    (llava_dir / "config.json").write_text(json.dumps(fields))
    released = transformers.SiglipVisionConfig(**{
        **config.vision_config.to_dict(), "vision_use_head": True,
        "num_hidden_layers": config.vision_config.num_hidden_layers + 1})
    transformers.SiglipVisionModel(released).save_pretrained(tmp_path / "siglip")
    return llava_dir, tmp_path / "siglip", model, processor, len(plain)


@pytest.mark.parametrize("model_type, pinpoints", [
    ("llava_qwen", "(1x1),...,(3x3)"),  # LLaVA-NeXT's training shorthand, 30-pixel tiles
    ("qwen2", [[30 * i, 30 * j] for i in range(1, 4) for j in range(1, 4)]),
])
def test_lmms_lab_onevision_directory_gives_transformers_logits(tmp_path, model_type, pinpoints):
    llava_dir, siglip_dir, reference, processor, vocab = write_original_onevision(
        tmp_path, model_type, pinpoints)
    loaded = convert_with_cli(llava_dir, siglip_dir, tmp_path / "jax")
    config = loaded.config
    assert config.image_aspect == "anyres_max_2" and config.text.model_type == "qwen2"
    assert config.vision.model_type == "siglip_vision_model"
    assert config.vision.num_layers == reference.config.vision_config.num_hidden_layers
    assert config.image_token_index == vocab  # <image> right after the tokenizer's tokens
    assert [list(p) for p in config.image_grid_pinpoints] == [
        [30 * i, 30 * j] for i in range(1, 4) for j in range(1, 4)]
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == vocab

    photos = [Image.fromarray(load()) for load in PHOTOS[:3]]
    texts = ["<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n",
             "<image> one, <image> two: which is the cat?", "A row with no image at all."]
    rows = [[photos[0]], [photos[1], photos[2]], []]  # tiled alone; one tile each when two
    ours = loaded.processor(text=texts, images=rows)
    theirs = processor(text=texts, images=rows, padding=True, return_tensors="pt")
    # Same ids except the pad id (the original's <|endoftext|>, llava-hf's added <pad>).
    real = ours["attention_mask"].astype(bool)
    np.testing.assert_array_equal(real, theirs["attention_mask"].numpy().astype(bool))
    np.testing.assert_array_equal(ours["input_ids"][real], theirs["input_ids"].numpy()[real])
    logits = np.asarray(loaded.model(**ours))
    with torch.no_grad():
        expected = reference(**theirs).logits.numpy()
    assert logits.shape == expected.shape  # every embedding row kept (Qwen2 has spare ones)
    np.testing.assert_allclose(logits[real], expected[real], atol=TOL, rtol=0)


def test_original_layouts_are_told_apart_by_architecture(tmp_path):
    """Released configs name the class in `architectures`, not always in model_type:
    liuhaotian's v1.5 / v1.6-Vicuna say model_type 'llava' (transformers' LLaVA has the same
    name); hf-to-jax on one says to use llava-to-jax, and llava-to-jax takes it."""
    assert hf_config.original_kind({"model_type": "llava",
                                    "architectures": ["LlavaLlamaForCausalLM"]}) == "llava_llama"
    assert hf_config.original_kind({"model_type": "qwen2",
                                    "architectures": ["LlavaQwenForCausalLM"]}) == "llava_qwen"
    assert hf_config.original_kind({"model_type": "llava", "text_config": {},
                                    "architectures": ["LlavaForConditionalGeneration"]}) is None
    llava_dir, clip_dir, state, _, vocab = write_original_next(tmp_path, "llama")
    fields = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps(dict(fields, model_type="llava")))
    done = subprocess.run([sys.executable, "-m", "llava_jax.convert", "hf-to-jax", "--input",
                           str(llava_dir), "--output", str(tmp_path / "hf")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "llava-to-jax" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert convert_with_cli(llava_dir, clip_dir, tmp_path / "jax").config.anyres


def test_a_trained_tower_missing_from_the_checkpoint_is_an_error(tmp_path):
    from llava_jax.convert import llava_to_jax
    from llava_jax.convert.tensors import CheckpointError

    llava_dir, clip_dir, *_ = write_original_next(tmp_path, "llama")
    fields = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps(dict(fields, unfreeze_mm_vision_tower=True)))
    with pytest.raises(CheckpointError, match="unfreeze_mm_vision_tower"):
        llava_to_jax(str(llava_dir), str(clip_dir), str(tmp_path / "jax"), progress=False)
    assert not (tmp_path / "jax").exists()  # nothing half-written
