"""Checkpoint conversion, PyTorch <-> llava_jax, streamed tensor by tensor.

hf_to_jax:    transformers `LlavaForConditionalGeneration` (or `LlavaNext...` / `LlavaOnevision...`)
              directory -> model directory
llava_to_jax: original LLaVA (`LlavaLlamaForCausalLM`) + CLIP directory (or a plain LLaMA
              + a stage-1 `mm_projector.bin`) -> model directory
jax_to_hf:    model directory -> `LlavaForConditionalGeneration` directory (tiled models:
              `LlavaNext...` / `LlavaOnevision...`)

Peak memory is about one stacked parameter (e.g. all layers' MLP up-projections), never
the whole model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from llava_jax import checkpoint
from llava_jax.convert import hf_config, mapping
from llava_jax.convert.tensors import CheckpointError, ShardedSafetensorsWriter, TensorReader, cast
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import abstract_model

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja")
# The processor's files (image processor settings, transformers' processor settings): kept
# next to the tokenizer, so the folder is a whole transformers processor.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} not found.")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e}).") from e


def _specs(config: LlavaConfig) -> list[mapping.ParamSpec]:
    return mapping.param_specs(config, mapping.flat_param_shapes(abstract_model(config)))


def _check_names(specs, available: set[str], describe: Callable[[str], str], where: str) -> None:
    """Raises CheckpointError listing missing and unexpected tensors."""
    wanted = {name for spec in specs for name in spec.torch_names}
    missing = sorted(wanted - available)
    unexpected = sorted(available - wanted)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {missing[:8]}"
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: "
                        f"{[describe(n) for n in unexpected[:8]]}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{where} does not match the model in its config: "
                              + "; ".join(problems) + ".")


def _write_params(specs, get_tensor: Callable[[str], np.ndarray], describe: Callable[[str], str],
                  writer: checkpoint.ModelWriter, dtype, progress: bool) -> None:
    """Reads each spec's torch tensors, checks shapes, transforms, stacks and saves."""
    total = sum(len(spec.torch_names) for spec in specs)
    with tqdm(total=total, desc="tensors", unit="tensor", disable=not progress) as bar:
        for spec in specs:
            out = np.empty(spec.shape, dtype)
            per_layer_shape = spec.shape[1:] if spec.stacked else spec.shape
            for i, name in enumerate(spec.torch_names):
                tensor = spec.to_ours(get_tensor(name))
                if tensor.shape != per_layer_shape:
                    raise CheckpointError(
                        f"{describe(name)}: shape {tuple(spec.to_torch(tensor).shape)} does not "
                        f"match the config (expected {tuple(spec.to_torch(np.empty(per_layer_shape)).shape)}).")
                value = cast(tensor, dtype, describe(name))
                if spec.stacked:
                    out[i] = value
                else:
                    out[...] = value
                bar.update()
            writer.add(spec.path, out)
            del out


def _resolve_dtype(dtype: str | None, fallback: str) -> tuple[str, type]:
    name = dtype or fallback
    if name not in _NP_DTYPES:
        raise ValueError(f"--dtype={name!r}; use one of {sorted(_NP_DTYPES)}.")
    return name, _NP_DTYPES[name]


def _torch_dtype_name(config_json: dict, default: str = "float32") -> str:
    name = config_json.get("torch_dtype") or config_json.get("dtype") or default
    name = str(name).replace("torch.", "")
    return name if name in _NP_DTYPES else default


def _copy_tokenizer(source: Path, target: Path) -> Path | None:
    """Copies the tokenizer and processor files present in `source` to `target`."""
    files = [source / f for f in TOKENIZER_FILES + PROCESSOR_FILES if (source / f).exists()]
    if not files:
        return None
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, target / f.name)
    return target


# ----- hf-to-jax -----

def hf_to_jax(input_dir: str, output_dir: str, *, dtype: str | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """transformers LLaVA directory -> llava_jax model directory."""
    input_dir = Path(input_dir)
    config_json = _read_json(input_dir / "config.json")
    config = hf_config.from_hf_llava(config_json, str(input_dir / "config.json"))
    dtype_name, np_dtype = _resolve_dtype(dtype, _torch_dtype_name(config_json))
    config = config.replace(param_dtype=dtype_name, dtype=dtype_name)
    reader = TensorReader(input_dir, mapping.canonical_hf_name)
    specs = _specs(config)
    _check_names(specs, set(reader.names()), lambda n: f"{reader.source_of(n)}:{n}", str(input_dir))
    with checkpoint.ModelWriter(output_dir, config, overwrite=overwrite) as writer:
        _write_params(specs, reader.get, lambda n: f"{reader.source_of(n)}:{n}", writer, np_dtype,
                      progress)
        _copy_tokenizer(input_dir, writer.stage / checkpoint.TOKENIZER_DIR)
        return writer.finish()


# ----- llava-to-jax -----

def _pad_rows(table: np.ndarray, new_rows: int, seed: int) -> np.ndarray:
    """Appends rows drawn from N(mean, 1e-5 * cov) of the existing rows, as transformers'
    LLaVA conversion initialises the added <image>/<pad> embeddings."""
    if new_rows <= 0:
        return table
    base = table.astype(np.float64)
    mean = base.mean(0)
    centered = base - mean
    # x = mean + sqrt(1e-5 / n) * centered^T g, g ~ N(0, I_n) has covariance 1e-5 * cov
    # exactly, without forming or factorising the [hidden, hidden] covariance.
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((new_rows, base.shape[0]))
    extra = mean + np.sqrt(1e-5 / base.shape[0]) * (noise @ centered)
    return np.concatenate([table, extra.astype(table.dtype)], axis=0)


def _write_image_tokenizer(input_dir: Path, target: Path, vocab_size: int) -> None:
    """Saves the LLaMA tokenizer with <image> and <pad> added as transformers' conversion does
    (ids vocab_size and vocab_size + 1); nothing when the input has no tokenizer.json."""
    image_index, pad_index = vocab_size, vocab_size + 1
    if not (input_dir / "tokenizer.json").exists():
        if (input_dir / "tokenizer.model").exists():
            log.warning("%s has only a SentencePiece tokenizer.model; the model directory gets no "
                        "tokenizer (add a tokenizer.json to convert it). <image>=%d, <pad>=%d.",
                        input_dir, image_index, pad_index)
        return
    # Only here: transformers takes seconds to import, and only this path needs it.
    from transformers import AddedToken, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(input_dir))
    if len(tokenizer) != vocab_size:
        raise CheckpointError(f"{input_dir}: tokenizer has {len(tokenizer)} tokens but the "
                              f"embedding table has {vocab_size} rows.")
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids("<image>") == image_index
    assert tokenizer.convert_tokens_to_ids("<pad>") == pad_index
    tokenizer.save_pretrained(str(target))


def _own_tower_config(vision_json: dict, names, input_dir: Path) -> dict:
    """The --vision-tower config cut to the layers the checkpoint holds, without the head."""
    vision = dict(vision_json.get("vision_config", vision_json))
    layers = {int(m.group(1)) for m in map(re.compile(
        r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.").match, names) if m}
    if not layers:
        raise CheckpointError(f"{input_dir}: the checkpoint's vision tower has no encoder "
                              "layers (model.vision_tower.vision_tower.vision_model.encoder."
                              "layers.*).")
    if max(layers) + 1 > vision.get("num_hidden_layers", 0):
        raise CheckpointError(f"{input_dir}: the checkpoint's vision tower has {max(layers) + 1} "
                              f"layers, more than the --vision-tower config's "
                              f"{vision.get('num_hidden_layers')}: not this tower's checkpoint.")
    return dict(vision, num_hidden_layers=max(layers) + 1, vision_use_head=False)


def _qwen_image_tokenizer(input_dir: Path, config_json: dict, rows: int):
    """(tokenizer with <image>, <image> id, pad id) for a Qwen2 LLaVA: <image> added after the
    tokenizer's last token (as llava-hf's OneVision conversion adds it) into one of the
    embedding table's spare rows; pad the tokenizer's own."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    if not (input_dir / "tokenizer.json").exists():
        raise CheckpointError(f"{input_dir}: a llava_qwen checkpoint needs its tokenizer.json "
                              "(the <image> id follows its last token).")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(input_dir))
    image_index = len(tokenizer)
    if image_index >= rows:
        raise CheckpointError(f"{input_dir}: the tokenizer's {image_index} tokens leave no spare "
                              f"row for <image> in the {rows}-row embedding table.")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = config_json.get("pad_token_id") or tokenizer.eos_token_id
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    assert tokenizer.convert_tokens_to_ids("<image>") == image_index
    return tokenizer, image_index, pad


def _projector_type_from_names(names: list[str]) -> str:
    indices = sorted({int(n.split(".")[1].split("_")[1]) for n in names
                      if n.startswith("multi_modal_projector.linear_")})
    if not indices:
        raise CheckpointError("The projector file holds no mm_projector.N.weight tensors.")
    return "linear" if len(indices) == 1 else f"mlp{len(indices)}x_gelu"


def llava_to_jax(input_dir: str, vision_tower_dir: str, output_dir: str, *,
                 projector: str | None = None, init_projector: str | None = None,
                 dtype: str | None = None,
                 vision_feature_layer: int | None = None, image_aspect: str | None = None,
                 overwrite: bool = False, progress: bool = True, seed: int = 0) -> Path:
    """Original LLaVA layout (+ separate CLIP) -> llava_jax model directory.

    With `projector` (a stage-1 `mm_projector.bin`), `input_dir` may be a plain
    Vicuna/LLaMA: the result is a stage-2 starting point. With `init_projector` (a projector
    type, e.g. 'mlp2x_gelu') instead, a plain LLaMA gets a freshly initialised projector:
    the starting point of stage 1, which trains it.
    Without either, `input_dir` must be an original LLaVA model.
    Vicuna/LLaMA: the result is a stage-2 starting point.
    """
    input_dir, vision_dir = Path(input_dir), Path(vision_tower_dir)
    config_json = _read_json(input_dir / "config.json")
    model_type = hf_config.original_kind(config_json) or config_json.get("model_type")
    if model_type == "llava":
        raise CheckpointError(f"{input_dir} is a transformers LLaVA directory; use `hf-to-jax`.")
    if model_type not in ("llava_llama", "llava_mistral", "llava_qwen", "llama"):
        raise CheckpointError(f"{input_dir / 'config.json'}: model_type {model_type!r} "
                              f"(architectures {config_json.get('architectures')}) is not an "
                              "original LLaVA (LlavaLlamaForCausalLM, LlavaMistralForCausalLM, "
                              "LlavaQwenForCausalLM) or LLaMA model.")
    if projector is not None and init_projector is not None:
        raise ValueError("Pass either --projector (a trained one) or --init-projector, not both.")
    if model_type == "llama" and projector is None and init_projector is None:
        raise CheckpointError(f"{input_dir} is a plain LLaMA model; pass --projector "
                              "mm_projector.bin (stage-1 output) for a stage-2 start, or "
                              "--init-projector mlp2x_gelu for a stage-1 start.")
    if init_projector is not None and model_type != "llama":
        raise CheckpointError(f"{input_dir} already holds a LLaVA projector; --init-projector "
                              "is for plain LLaMA/Vicuna models.")
    clip_json = _read_json(vision_dir / "config.json")

    llava_reader = TensorReader(input_dir, mapping.canonical_llava_name)
    # A run that trained the tower (LLaVA-1.6, unfreeze_mm_vision_tower; lmms-lab's OneVision,
    # whose SigLIP is one layer short of the released one: the original drops the last layer
    # and the pooling head) keeps it in the checkpoint, and that tower is the model's;
    # --vision-tower then gives only the tower's config. Otherwise the separate CLIP is it.
    own_tower = any(name.startswith("vision_tower.") for name in llava_reader.names())
    if model_type == "llava_qwen" and not own_tower:
        raise CheckpointError(f"{input_dir}: a LlavaQwenForCausalLM checkpoint without its "
                              "vision tower (model.vision_tower.vision_tower.*); OneVision "
                              "keeps its trained, one-layer-shorter SigLIP there.")
    if config_json.get("unfreeze_mm_vision_tower") and not own_tower:
        raise CheckpointError(f"{input_dir}: config.json says unfreeze_mm_vision_tower=true but "
                              "the checkpoint holds no model.vision_tower.vision_tower.* "
                              "tensors: the trained tower is missing (the base tower from "
                              "--vision-tower is not what this model was trained with).")
    readers = [llava_reader]
    if own_tower:
        logging.info("the vision tower comes from %s (trained with the model); %s gives its "
                     "config only", input_dir, vision_dir)
        clip_json = _own_tower_config(clip_json, llava_reader.names(), input_dir)
    else:
        readers.append(TensorReader(vision_dir, mapping.canonical_clip_name))
    if projector is not None:
        readers.append(TensorReader(projector, mapping.canonical_llava_name))
    owner: dict[str, TensorReader] = {}
    for reader in readers:
        for name in reader.names():
            if name.startswith("multi_modal_projector.") and projector is not None and reader is llava_reader:
                continue  # an explicit projector file wins
            owner[name] = reader
    describe = lambda n: f"{owner[n].source_of(n)}:{n}" if n in owner else n

    embed_name = "language_model.model.embed_tokens.weight"
    if embed_name not in owner:
        raise CheckpointError(f"{input_dir}: no model.embed_tokens.weight tensor.")
    old_vocab = owner[embed_name].shape(embed_name)[0]
    padded_vocab = -(-(old_vocab + 2) // 64) * 64
    # transformers' conversion appends <image> then <pad> to the vocabulary.
    image_index, pad_index = old_vocab, old_vocab + 1
    qwen_tokenizer = None
    if model_type == "llava_qwen":  # Qwen2's table has spare rows: <image> takes the next id
        qwen_tokenizer, image_index, pad_index = _qwen_image_tokenizer(input_dir, config_json,
                                                                       old_vocab)
        padded_vocab = old_vocab
    projector_type = init_projector
    if projector is not None:
        projector_type = _projector_type_from_names(
            [n for n in owner if n.startswith("multi_modal_projector.")])
    llava_fields = dict(config_json)
    if vision_feature_layer is not None:
        llava_fields["mm_vision_select_layer"] = vision_feature_layer
    elif model_type == "llama":
        llava_fields.setdefault("mm_vision_select_layer", -2)  # the LLaVA-1.5 recipe
    if image_aspect is not None:
        llava_fields["image_aspect_ratio"] = image_aspect
    elif model_type == "llama":
        llava_fields.setdefault("image_aspect_ratio", "pad")
    config = hf_config.from_original_llava(
        llava_fields, clip_json, vocab_size=padded_vocab, image_token_index=image_index,
        pad_token_id=pad_index, projector_type=projector_type,
        source=str(input_dir / "config.json"))
    dtype_name, np_dtype = _resolve_dtype(dtype, _torch_dtype_name(config_json))
    config = config.replace(param_dtype=dtype_name, dtype=dtype_name)
    if not config.anyres:
        owner.pop("image_newline", None)  # a flat model has no use for a 1.6 newline

    head_name = "language_model.lm_head.weight"
    specs = _specs(config)
    fresh_projector = {}
    if init_projector is not None:  # the initialisation of transformers' nn.Linear
        rng = np.random.default_rng(seed)
        for spec in specs:
            if spec.path.startswith("multi_modal_projector/"):
                (name,) = spec.torch_names
                shape = spec.to_torch(np.empty(spec.shape, np.int8)).shape
                first = name.startswith("multi_modal_projector.linear_1.")
                fan_in = config.projector_input_size if first else config.text.hidden_size
                bound = 1 / np.sqrt(fan_in)
                fresh_projector[name] = rng.uniform(-bound, bound, shape).astype(np.float32)

    def get_tensor(name: str) -> np.ndarray:  # each name is read once
        if name in (embed_name, head_name):
            source = name if name in owner else embed_name  # tied head -> cloned
            table = np.asarray(owner[source].get(source))
            return _pad_rows(table, padded_vocab - table.shape[0], seed + (name == head_name))
        if name in fresh_projector:
            return fresh_projector[name]
        return owner[name].get(name)

    available = set(owner) | {head_name} | set(fresh_projector)
    _check_names(specs, available, describe, f"{input_dir} + {vision_dir}")
    with checkpoint.ModelWriter(output_dir, config, overwrite=overwrite) as writer:
        if qwen_tokenizer is not None:
            qwen_tokenizer.save_pretrained(str(writer.stage / checkpoint.TOKENIZER_DIR))
        else:
            _write_image_tokenizer(input_dir, writer.stage / checkpoint.TOKENIZER_DIR, old_vocab)
        _write_params(specs, get_tensor, describe, writer, np_dtype, progress)
        return writer.finish()


# ----- jax-to-hf -----

def jax_to_hf(input_dir: str, output_dir: str, *, dtype: str | None = None,
              overwrite: bool = False, progress: bool = True,
              max_shard_bytes: int = 2 << 30) -> Path:
    """llava_jax model directory (or training workdir) -> transformers LLaVA directory.

    A LoRA checkpoint (lora_config.json) is written merged: base (dequantized for QLoRA) +
    (alpha / rank) A @ B per kernel, in float32, then `dtype`."""
    input_dir, output = Path(input_dir), Path(output_dir)
    config = checkpoint.read_config(input_dir)
    dtype_name, np_dtype = _resolve_dtype(dtype, config.param_dtype)
    hf_json = hf_config.to_hf_llava(config, torch_dtype=dtype_name)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it.")
    stage = output.with_name(output.name + ".incomplete")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        stored = checkpoint.stored_param_dtypes(input_dir)
        read_leaf = lambda path, shape: checkpoint.load_param_leaf(input_dir, path, shape,
                                                                   stored[path])
        adapters = checkpoint.read_lora_config(input_dir)
        if adapters is not None:  # a LoRA checkpoint: adapters merged in float32
            from llava_jax.convert.adapters import merged_leaf_reader

            read_leaf = merged_leaf_reader(input_dir, config, adapters)
        specs = _specs(config)
        writer = ShardedSafetensorsWriter(stage, max_shard_bytes)
        writer.plan([(name, _torch_shape(spec), np_dtype) for spec in specs
                     for name in spec.torch_names])
        total = sum(len(spec.torch_names) for spec in specs)
        with tqdm(total=total, desc="tensors", unit="tensor", disable=not progress) as bar:
            for spec in specs:
                array = read_leaf(spec.path, spec.shape)
                for i, name in enumerate(spec.torch_names):
                    value = spec.to_torch(array[i] if spec.stacked else array)
                    writer.add(name, cast(value, np_dtype, name))
                    bar.update()
                del array
        writer.close()
        (stage / "config.json").write_text(json.dumps(hf_json, indent=2))
        _write_processor_config(stage, config)  # a carried-over one (below) replaces it
        tokenizer_dir = input_dir / checkpoint.TOKENIZER_DIR
        if tokenizer_dir.is_dir():
            _copy_tokenizer(tokenizer_dir, stage)
        shutil.rmtree(output, ignore_errors=True)
        stage.rename(output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return output


def _torch_shape(spec: mapping.ParamSpec) -> tuple[int, ...]:
    per_layer = spec.shape[1:] if spec.stacked else spec.shape
    return tuple(spec.to_torch(np.empty(per_layer, np.int8)).shape)


def _write_processor_config(directory: Path, config: LlavaConfig) -> None:
    """The image-processor settings of the model (`data.processor.default_preprocessor_config`:
    CLIPImageProcessor, SiglipImageProcessor, LlavaNextImageProcessor or
    LlavaOnevisionImageProcessor) and the processor's (`processor_config.json`: what the
    transformers processor needs to count placeholders), so `AutoProcessor.from_pretrained`
    works on the output."""
    from llava_jax.data.processor import default_preprocessor_config

    (directory / "preprocessor_config.json").write_text(
        json.dumps(default_preprocessor_config(config), indent=2))
    strategy = "default" if config.vision_feature_select_strategy == "patch" else "full"
    if config.anyres and config.image_aspect != "anyres":
        processor = dict(processor_class="LlavaOnevisionProcessor",
                         num_image_tokens=(config.vision.image_size
                                           // config.vision.patch_size) ** 2,
                         vision_feature_select_strategy=strategy,
                         vision_aspect_ratio=config.image_aspect)
    else:
        processor = dict(processor_class="LlavaNextProcessor" if config.anyres else "LlavaProcessor",
                         patch_size=config.vision.patch_size,
                         vision_feature_select_strategy=strategy,
                         num_additional_image_tokens=int(config.vision.has_class_token))
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))
