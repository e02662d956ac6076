"""The model checkpoint format shared by conversion, training, inference and evaluation.

A model directory is self-describing:

    MODEL_DIR/
      llava_config.json   the LlavaConfig (architecture + compute defaults)
      tokenizer/          tokenizer files, when known (tokenizer.json, tokenizer_config.json, ...)
      params/             an orbax PyTree checkpoint of the parameters: a nested dict
                          mirroring the flax module tree (stacked [layers, ...] arrays)

A training workdir holds `llava_config.json` and `tokenizer/` at its top and an orbax
`CheckpointManager` directory `checkpoints/<step>/params/` (plus optimizer and data state);
`load_pretrained` accepts either. A LoRA run's workdir (or an imported PEFT adapter's model
directory) also holds `lora_config.json` (models/lora.py's LoraConfig): its params are the
adapted model's (base kernels, or their int8 / nf4 codes, plus `lora_a` / `lora_b`).

Writes are atomic: everything goes to `<dir>.incomplete` first and is renamed at the end,
so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp1
from flax import nnx

from llava_jax.data.tokenize import load_tokenizer as load_tokenizer_dir
from llava_jax.models import lora
from llava_jax.models.config import LlavaConfig, jnp_dtype
from llava_jax.models.llava import abstract_params
from llava_jax.tree import flat_path, unflatten

CONFIG_FILE = "llava_config.json"
TOKENIZER_DIR = "tokenizer"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
LORA_FILE = "lora_config.json"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def quiet_orbax() -> None:
    """Silences orbax's warnings (a few per save or restore, none actionable here)."""
    warnings.filterwarnings("ignore", module=r"orbax\..*")


# ----- writing -----

class ModelWriter:
    """Streams parameters into a new model directory, one array at a time.

    with ModelWriter(out, config) as writer:
        writer.add("language_model/norm/scale", array)
        ...
        writer.finish(tokenizer_dir=...)
    """

    def __init__(self, output: str | os.PathLike, config: LlavaConfig, *, overwrite: bool = False):
        self.output = Path(output)
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"{self.output} already exists; pass --overwrite to replace it.")
        self.stage = self.output.with_name(self.output.name + ".incomplete")
        if self.stage.exists():
            shutil.rmtree(self.stage)  # leftovers of an interrupted run, never a finished model
        self.stage.mkdir(parents=True)
        self.config = config
        self.params_path = self.stage / PARAMS_DIR
        self.added: set[str] = set()
        quiet_orbax()
        self.finished = False

    def add(self, path: str, array: np.ndarray) -> None:
        """Saves one parameter (our flat path, full stacked shape)."""
        tree: dict[str, Any] = {}
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(array)
        ocp1.partial.save(self.params_path, tree)
        self.added.add(path)

    def add_tree(self, tree: dict) -> None:
        """Saves a nested dict of arrays in one go (small models, trained params)."""
        ocp1.partial.save(self.params_path, tree)

    def finish(self, tokenizer_dir: str | os.PathLike | None = None, tokenizer=None) -> Path:
        ocp1.partial.finalize(self.params_path)
        (self.stage / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.stage / TOKENIZER_DIR))
        elif tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, self.stage / TOKENIZER_DIR)
        if self.output.exists():
            shutil.rmtree(self.output)
        self.stage.rename(self.output)
        self.finished = True
        return self.output

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.finished:
            shutil.rmtree(self.stage, ignore_errors=True)
        return False


def save_model(model, output: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes an in-memory LlavaModel (and optionally its tokenizer) as a model directory."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with ModelWriter(output, model.config, overwrite=overwrite) as writer:
        writer.add_tree(params)
        return writer.finish(tokenizer=tokenizer)


# ----- reading -----

def read_config(path: str | os.PathLike) -> LlavaConfig:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointNotFoundError(
            f"{config_path} not found: {path} is not a llava_jax model directory or training "
            "workdir (convert PyTorch weights with `python -m llava_jax.convert`).")
    try:
        return LlavaConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: invalid model config ({e}).") from e


# The template each decoder family's LLaVA releases were trained with, for a converted
# model directory (no train_config.json to say): LLaVA-1.5 / Vicuna, LLaVA-NeXT's Llama-3 and
# Mistral models, and the Qwen2 ones (LLaVA-OneVision).
DEFAULT_TEMPLATE = "vicuna_v1"
LLAMA_3_VOCAB_SIZE = 128256


def checkpoint_template(path: str | os.PathLike) -> str:
    """The conversation template to talk to a checkpoint with, when the user names none.

    A training workdir (or one of its stage directories) records the template it trained with
    in `train_config.json`; a converted model directory gets its decoder family's (Qwen2:
    `qwen_1_5`, Mistral: `mistral_instruct`, Llama-3: `llava_llama_3`, else LLaVA-1.5's
    `vicuna_v1`). Raises ValueError when train_config.json names a template that does not
    exist (a typo would otherwise silently change every prompt).
    """
    from llava_jax.data.conversation import TEMPLATES  # data imports models; keep this lazy

    train_config = Path(path) / "train_config.json"
    if train_config.exists():
        try:
            template = json.loads(train_config.read_text())["data"]["template"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{train_config}: no readable data.template ({e!r}).") from e
        if template not in TEMPLATES:
            raise ValueError(f"{train_config}: data.template {template!r} is not one of "
                             f"{sorted(TEMPLATES)}.")
        return template
    text = read_config(path).text
    if text.model_type == "qwen2":
        return "qwen_1_5"
    if text.model_type == "mistral":
        return "mistral_instruct"
    if text.vocab_size >= LLAMA_3_VOCAB_SIZE:
        return "llava_llama_3"
    return DEFAULT_TEMPLATE


def read_lora_config(path: str | os.PathLike) -> lora.LoraConfig | None:
    """The adapters of a LoRA workdir / model directory, or None for a plain model."""
    lora_path = Path(path) / LORA_FILE
    if not lora_path.exists():
        return None
    try:
        return lora.LoraConfig.from_dict(json.loads(lora_path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{lora_path}: invalid LoRA config ({e}).") from e


def write_lora_config(path: str | os.PathLike, config: lora.LoraConfig) -> None:
    (Path(path) / LORA_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def params_directory(path: str | os.PathLike, step: int | None = None) -> Path:
    """The orbax params directory of a model directory or (latest step of) a training workdir."""
    path = Path(path)
    if (path / PARAMS_DIR).exists():
        candidate = path / PARAMS_DIR
    else:
        steps_root = path / CHECKPOINTS_DIR
        steps = sorted(int(p.name) for p in steps_root.iterdir()
                       if p.name.isdigit()) if steps_root.is_dir() else []
        if not steps:
            raise CheckpointNotFoundError(f"{path}: no params/ directory and no finished "
                                          f"checkpoints under {steps_root}.")
        if step is not None and step not in steps:
            raise CheckpointNotFoundError(f"{path}: no checkpoint for step {step}; have {steps}.")
        candidate = steps_root / str(step if step is not None else steps[-1]) / PARAMS_DIR
    # A partial-save (conversion) checkpoint nests the tree one level down.
    return candidate / "state" if (candidate / "state" / "_METADATA").exists() else candidate


def load_params(path: str | os.PathLike, abstract_params: Any, *, step: int | None = None,
                partial: bool = False) -> Any:
    """Restores the params tree into the given abstract tree (shapes, dtypes, shardings).

    Leaves with a `.sharding` come back as sharded jax.Arrays, others as numpy arrays.
    partial: `abstract_params` names only a sub-tree; the rest is never read.
    """
    quiet_orbax()
    directory = params_directory(path, step)

    def restore_args(leaf):
        sharding = getattr(leaf, "sharding", None)
        return ocp.ArrayRestoreArgs(dtype=leaf.dtype, sharding=sharding,
                                    global_shape=leaf.shape) if sharding is not None else \
            ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        return checkpointer.restore(directory.absolute(), args=ocp.args.PyTreeRestore(
            item=abstract_params, restore_args=jax.tree.map(restore_args, abstract_params),
            partial_restore=partial))
    except ValueError as e:
        raise ValueError(f"{directory}: parameters do not match the model described by "
                         f"{CONFIG_FILE} ({e}).") from e


def load_param_leaf(path: str | os.PathLike, flat_name: str, shape, dtype) -> np.ndarray:
    """Restores one parameter by flat path without reading the rest (for streaming export)."""
    out = load_params(path, unflatten({flat_name: jax.ShapeDtypeStruct(tuple(shape), dtype)}),
                      partial=True)
    for part in flat_name.split("/"):
        out = out[part]
    return out


def stored_param_dtypes(path: str | os.PathLike) -> dict[str, np.dtype]:
    """Flat path -> dtype as stored on disk."""
    quiet_orbax()
    metadata = ocp.PyTreeCheckpointer().metadata(params_directory(path).absolute())
    tree = getattr(metadata, "item_metadata", None) or getattr(metadata, "tree", metadata)
    tree = getattr(tree, "tree", tree)
    return {flat_path(key_path): np.dtype(leaf.dtype)
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (`data.load_tokenizer` on its tokenizer/ folder), or None."""
    tokenizer_dir = Path(path) / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer.json").exists():
        return None
    return load_tokenizer_dir(str(tokenizer_dir))


@dataclasses.dataclass
class Pretrained:
    """What `load_pretrained` returns."""

    model: Any  # LlavaModel
    config: LlavaConfig
    tokenizer: Any  # transformers PreTrainedTokenizerFast or None
    # data.processor.Processor (text + PIL images -> model inputs), or None without a tokenizer.
    processor: Any = None


def load_pretrained(path: str | os.PathLike, dtype: str | None = None, *,
                    param_dtype: str | None = None, step: int | None = None,
                    merge_lora: bool = True) -> Pretrained:
    """Loads a model directory (or training workdir) into a ready-to-call LlavaModel.

    Args:
      path: a directory written by `python -m llava_jax.convert` or `llava_jax.train`.
      dtype: compute dtype ('float32', 'bfloat16'); default: the checkpoint's.
      param_dtype: parameter dtype in memory; default: `dtype` if given, else the checkpoint's.
      step: for a training workdir, which step (default: latest).
      merge_lora: for a LoRA workdir / model directory: fold the adapters into the kernels
        (in float32, then `param_dtype`; a plain model, as fast as the base), or keep them
        as `LoraDense` modules (quantized bases stay quantized).
    Returns:
      Pretrained(model, config, tokenizer, processor). `model(input_ids, pixel_values=None,
      attention_mask=None)` returns float32 logits [batch, seq, vocab];
      `model(**processor(text=[...], images=[[PIL images], ...]))` too.
    """
    config = read_config(path)
    if dtype is not None:
        dtype = dtype if isinstance(dtype, str) else np.dtype(dtype).name  # jnp.bfloat16 too
        config = config.replace(dtype=dtype, param_dtype=param_dtype or dtype)
    elif param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    adapters = read_lora_config(path)
    if adapters is None:
        graphdef, abstract = abstract_params(config)
        params = load_params(path, abstract, step=step)
    else:
        graphdef, abstract = lora.abstract_lora_params(config, adapters)
        params = load_params(path, abstract, step=step)
        if merge_lora:
            params = lora.merge_params(params, adapters, jnp_dtype(config.param_dtype))
            graphdef = abstract_params(config)[0]
    model = nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))
    tokenizer = load_tokenizer(path)
    return Pretrained(model=model, config=config, tokenizer=tokenizer,
                      processor=load_processor(path, config, tokenizer))


def load_processor(path: str | os.PathLike, config: LlavaConfig, tokenizer):
    """The checkpoint's `data.processor.Processor` (from tokenizer/preprocessor_config.json,
    else the model config's defaults), or None without a tokenizer. A tokenizer / image
    processor that does not fit the model is logged and gives None: the model still loads."""
    if tokenizer is None:
        return None
    from llava_jax.data.processor import Processor, ProcessorError

    try:
        return Processor.from_directory(Path(path) / TOKENIZER_DIR, config, tokenizer)
    except ProcessorError as e:
        logging.getLogger(__name__).warning("%s: no processor (%s)", path, e)
        return None
