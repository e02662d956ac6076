"""LoRA adapters <-> PEFT (and the original LLaVA's LoRA release); merged exports.

write_peft_adapter:  LoRA workdir / model directory -> PEFT adapter directory
                     (adapter_config.json + adapter_model.safetensors; the projector, which a
                     LoRA run trains fully, and any whole module trained beside the adapters,
                     such as the LM head and embeddings, as PEFT `modules_to_save`)
import_peft_adapter: PEFT adapter directory (or the original's `adapter_model.*` +
                     `non_lora_trainables.bin`) + a converted base -> LoRA model directory
                     (trainable further, or served by `load_pretrained`)
merged_leaf_reader:  how `jax_to_hf` reads a LoRA checkpoint: adapters folded into the kernels

Layouts. Ours (models/lora.py): A [layers, in, rank], B [layers, rank, out], scaling
alpha / rank. PEFT's: per layer `...q_proj.lora_A.weight` [rank, in] = A[i].T and
`...lora_B.weight` [out, rank] = B[i].T, keys `base_model.model.<module path>`, module paths
of transformers 5 (`model.language_model.layers.N...`); older writers' `language_model.model.`
and the original's `model.layers.N...` are read too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from llava_jax import checkpoint, tree
from llava_jax.convert import mapping
from llava_jax.convert.tensors import CheckpointError, TensorReader, cast, write_safetensors
from llava_jax.models import lora
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import abstract_model

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ORIGINAL_NON_LORA = "non_lora_trainables.bin"  # the original's projector beside its adapter
PROJECTOR = "multi_modal_projector/"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _specs_by_path(config: LlavaConfig) -> dict[str, mapping.ParamSpec]:
    shapes = mapping.flat_param_shapes(abstract_model(config))
    return {spec.path: spec for spec in mapping.param_specs(config, shapes)}


def _require_lora(input_dir) -> lora.LoraConfig:
    adapters = checkpoint.read_lora_config(input_dir)
    if adapters is None:
        raise CheckpointError(f"{input_dir} holds no LoRA adapters (no {checkpoint.LORA_FILE}); "
                              "export the full model without --adapter-only.")
    return adapters


class _LeafReader:
    """One stored leaf at a time from a LoRA workdir / model directory."""

    def __init__(self, input_dir, config: LlavaConfig, adapters: lora.LoraConfig):
        self.input_dir = input_dir
        self.stored = checkpoint.stored_param_dtypes(input_dir)
        self.shapes = {path: leaf.shape for path, leaf in
                       tree.flatten(lora.abstract_lora_params(config, adapters)[1]).items()}
        self.modules = lora.adapted_modules(tree.unflatten(dict.fromkeys(self.stored, 0)))
        self.adapters = adapters

    def __call__(self, path: str) -> np.ndarray:
        if path not in self.stored:
            raise CheckpointError(f"{self.input_dir}: no parameter {path!r} stored")
        return checkpoint.load_param_leaf(self.input_dir, path, self.shapes[path],
                                          self.stored[path])

    def merged(self, path: str) -> np.ndarray:
        """A plain model's leaf: adapted kernels as base + (alpha / rank) A @ B, in float32."""
        module = path.rsplit("/", 1)[0]
        if not (path.endswith("/kernel") and module in self.modules):
            return self(path)
        names = [n for n in ("kernel", "kernel_codes", "kernel_scale", "lora_a", "lora_b")
                 if f"{module}/{n}" in self.stored]
        leaves = {n: self(f"{module}/{n}") for n in names}
        return np.asarray(lora.merged_kernel(leaves, self.adapters, jnp.float32))


def merged_leaf_reader(input_dir, config: LlavaConfig,
                       adapters: lora.LoraConfig) -> Callable[[str, tuple], np.ndarray]:
    """(path, shape) -> the plain model's leaf, for `core.jax_to_hf` on a LoRA checkpoint."""
    reader = _LeafReader(input_dir, config, adapters)
    return lambda path, shape: reader.merged(path)


# ----- export: PEFT adapter directory -----

def _module_name(canonical_weight: str) -> str:
    """'language_model.model.layers.3.self_attn.q_proj.weight' -> transformers' module path."""
    return mapping.transformers_module_name(canonical_weight[:-len(".weight")])


def write_peft_adapter(input_dir: str, output_dir: str, *, dtype: str | None = None,
                       overwrite: bool = False, base_model_name_or_path: str | None = None) -> Path:
    """A LoRA workdir / model directory -> a PEFT adapter directory.

    `peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE),
    output_dir)` then computes what the LoRA model computes, BASE being the base model
    exported with `jax-to-hf` (for a QLoRA run: PEFT adds the adapters to the float base,
    not to the int8 / nf4 one they were trained on; merge instead for the exact model).
    """
    input_dir, output = Path(input_dir), Path(output_dir)
    config = checkpoint.read_config(input_dir)
    adapters = _require_lora(input_dir)
    reader = _LeafReader(input_dir, config, adapters)
    if dtype is not None and dtype not in _NP_DTYPES:
        raise ValueError(f"--dtype={dtype!r}; use one of {sorted(_NP_DTYPES)}.")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it.")
    specs = _specs_by_path(config)
    saved_modules = _modules_to_save(input_dir, reader.stored, specs)
    tensors, patterns = {}, set()
    for module in reader.modules:
        spec = specs[f"{module}/kernel"]
        lora_a, lora_b = reader(f"{module}/lora_a"), reader(f"{module}/lora_b")
        out_dtype = _NP_DTYPES[dtype] if dtype else lora_a.dtype
        for i, name in enumerate(spec.torch_names):
            key = PEFT_PREFIX + _module_name(name)
            a, b = (lora_a[i], lora_b[i]) if spec.stacked else (lora_a, lora_b)
            tensors[f"{key}.lora_A.weight"] = cast(np.ascontiguousarray(a.T), out_dtype, key)
            tensors[f"{key}.lora_B.weight"] = cast(np.ascontiguousarray(b.T), out_dtype, key)
        # PEFT full-matches target_modules against module names: one alternative per module
        # kind, any layer index.
        patterns.add(re.escape(_module_name(spec.torch_names[0])).replace(
            r"\.layers\.0\.", r"\.layers\.\d+\."))
    for path, spec in specs.items():
        if path.startswith(PROJECTOR) or path.rsplit("/", 1)[0] in saved_modules:
            value = spec.to_torch(reader(path))
            (name,) = spec.torch_names
            key = PEFT_PREFIX + mapping.transformers_module_name(name)
            tensors[key] = cast(value, _NP_DTYPES[dtype] if dtype else value.dtype, key)
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "auto_mapping": {
            "base_model_class": "LlavaForConditionalGeneration",
            "parent_library": "transformers.models.llava.modeling_llava"},
        "base_model_name_or_path": base_model_name_or_path, "r": adapters.rank,
        "lora_alpha": adapters.alpha, "lora_dropout": adapters.dropout,
        "target_modules": "(" + "|".join(sorted(patterns)) + ")",
        "modules_to_save": ["multi_modal_projector", *sorted(saved_modules.values())],
        "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    stage = output.with_name(output.name + ".incomplete")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        write_safetensors(stage / ADAPTER_WEIGHTS, tensors)
        (stage / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        shutil.rmtree(output, ignore_errors=True)
        stage.rename(output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if adapters.base_quantization != "none":
        log.warning("%s: trained on a %s base; PEFT applies the adapters to the float base "
                    "(merge with jax-to-hf for the exact trained model)", input_dir,
                    adapters.base_quantization)
    return output


def _modules_to_save(input_dir, stored_paths, specs) -> dict[str, str]:
    """Whole modules a run's `config.trainable` trained besides adapters + projector (the LM
    head, the embeddings: configs/demo.py:lora), as {our module path: the transformers module
    name PEFT's `modules_to_save` matches}. PEFT saves such a module whole; a module trained
    only in part, or one inside the stacked layers (a norm of every layer), has no PEFT form."""
    extra = _other_trained_leaves(input_dir, stored_paths)
    modules: dict[str, str] = {}
    for path in extra:
        module = path.rsplit("/", 1)[0]
        spec = specs.get(path)
        siblings = [p for p in stored_paths if p.rsplit("/", 1)[0] == module]
        if spec is None or spec.stacked or not set(siblings) <= set(extra):
            raise CheckpointError(
                f"{input_dir} also trained {path} (config.trainable), which a PEFT adapter "
                "cannot carry (PEFT's modules_to_save holds whole modules outside the "
                "repeated layers): export the merged model instead (jax-to-hf without "
                "--adapter-only).")
        (name,) = spec.torch_names
        modules[module] = mapping.transformers_module_name(name).rsplit(".", 2)[-2]
    return modules


def _other_trained_leaves(input_dir, stored_paths) -> list[str]:
    """Stored leaves a run's `config.trainable` override trained beyond adapters + projector."""
    path = Path(input_dir) / "train_config.json"
    if not path.exists():
        return []
    try:
        pattern = json.loads(path.read_text()).get("trainable") or ""
    except ValueError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e}).") from e
    if not pattern:
        return []
    trained = re.compile(pattern)
    return sorted(p for p in stored_paths if trained.search(p) and not p.startswith(PROJECTOR)
                  and not re.search(lora.ADAPTER_LEAVES, p))


# ----- import: PEFT adapter directory (or the original's release) -----

_ADAPTER_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight")
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
                "lora_bias": "LoRA biases"}


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.exists():
        raise CheckpointError(f"{path} not found: {adapter_dir} is not a PEFT adapter directory.")
    try:
        fields = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e}).") from e
    if fields.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {fields.get('peft_type')!r}; only LORA adapters "
                              "are supported.")
    for key, what in _UNSUPPORTED.items():
        if fields.get(key):
            raise CheckpointError(f"{path}: {key}=true ({what}) is not supported.")
    if fields.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={fields['bias']!r}; only bias='none' is supported.")
    if fields.get("rank_pattern") or fields.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-module rank_pattern / alpha_pattern are not "
                              "supported (one rank and alpha for every module).")
    for key in ("r", "lora_alpha"):
        if key not in fields:
            raise CheckpointError(f"{path}: no {key!r} field.")
    return fields


def _adapter_files(adapter_dir: Path) -> list[Path]:
    for name in (ADAPTER_WEIGHTS, "adapter_model.bin"):
        if (adapter_dir / name).exists():
            files = [adapter_dir / name]
            break
    else:
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} or adapter_model.bin.")
    if (adapter_dir / ORIGINAL_NON_LORA).exists():
        files.append(adapter_dir / ORIGINAL_NON_LORA)
    return files


def import_peft_adapter(adapter_dir: str, base_dir: str, output_dir: str, *,
                        base_quantization: str = "none", overwrite: bool = False) -> Path:
    """A PEFT LoRA adapter + the converted base it was trained on -> a LoRA model directory.

    base_dir: a llava_jax model directory of the adapter's base (`hf-to-jax` / `llava-to-jax`).
    The result holds the base (int8 / nf4 with `base_quantization`), the adapters and the
    adapter's projector (`modules_to_save`, or the original's non_lora_trainables.bin) and any
    other whole module it saved (an LM head, the embeddings) when it has them; train on with
    `--config.model.base_dir=OUTPUT --config.lora.rank=R`, or load with
    `load_pretrained(OUTPUT)`. Modules the adapter holds for only some layers get zero adapters
    on the others (logged).
    """
    adapter_dir, base_path = Path(adapter_dir), Path(base_dir)
    fields = _read_adapter_config(adapter_dir)
    config = checkpoint.read_config(base_path)
    if checkpoint.read_lora_config(base_path) is not None:
        raise CheckpointError(f"{base_path} already holds LoRA adapters; pass the plain base.")
    rank = int(fields["r"])
    alpha = float(fields["lora_alpha"])
    if fields.get("use_rslora"):  # scaling alpha / sqrt(r) == (alpha sqrt(r)) / r
        alpha *= math.sqrt(rank)
    specs = _specs_by_path(config)
    by_torch = {name: (spec, i) for spec in specs.values() for i, name in enumerate(spec.torch_names)}
    files = _adapter_files(adapter_dir)
    readers = [TensorReader(f) for f in files]
    raw_names = [(reader, n) for reader in readers for n in reader.names()]
    stripped = [n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n for _, n in raw_names]
    original = len(files) > 1 or any(n.startswith(("model.layers.", "model.mm_projector."))
                                     for n in stripped)
    canonical = mapping.canonical_llava_name if original else mapping.canonical_hf_name

    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    whole: dict[str, np.ndarray] = {}  # modules_to_save tensors: our path -> value
    unknown = []
    for (reader, raw), name in zip(raw_names, stripped):
        match = _ADAPTER_KEY.fullmatch(name)
        if match:
            target = by_torch.get(canonical(match["module"] + ".weight") or "")
            if target is None or not target[0].path.endswith("/kernel") or \
                    target[0].path.startswith(PROJECTOR):
                unknown.append(raw)
                continue
            spec, layer = target
            value = np.asarray(reader.get(raw), np.float32).T  # ours: A [in, r], B [r, out]
            expected = spec.shape[-2] if match["which"] == "A" else spec.shape[-1]
            rank_dim, width = (value.shape[1], value.shape[0]) if match["which"] == "A" else \
                value.shape
            if rank_dim != rank or width != expected:
                raise CheckpointError(f"{raw}: shape {value.T.shape} does not fit rank {rank} on "
                                      f"{spec.path} of shape {spec.shape}.")
            module = spec.path[:-len("/kernel")]
            found.setdefault(module, {"A": {}, "B": {}})[match["which"]][layer] = value
            continue
        if ".original_module." in name:  # PEFT's untouched copy of a modules_to_save module
            continue
        name = re.sub(r"\.modules_to_save\.[A-Za-z0-9_]+\.", ".", name)
        target = by_torch.get(canonical(name) or "")
        # A whole tensor in an adapter file is a modules_to_save module's: the projector, or
        # an LM head / embedding table trained beside the adapters (never a stacked layer's).
        if target is not None and not target[0].stacked:
            whole[target[0].path] = target[0].to_ours(np.asarray(reader.get(raw)))
        else:
            unknown.append(raw)
    if unknown:
        raise CheckpointError(f"{adapter_dir}: {len(unknown)} tensors do not map onto the base in "
                              f"{base_path}: {unknown[:8]}" + (" ..." if len(unknown) > 8 else ""))
    if not found:
        raise CheckpointError(f"{adapter_dir}: no lora_A / lora_B tensors.")
    projector_paths = [p for p in specs if p.startswith(PROJECTOR)]
    projector = {p for p in whole if p.startswith(PROJECTOR)}
    if projector and projector != set(projector_paths):
        raise CheckpointError(f"{adapter_dir}: projector tensors for {sorted(projector)} but "
                              f"the base's projector has {sorted(projector_paths)}.")
    adapters = lora.LoraConfig(
        rank=rank, alpha=alpha, dropout=float(fields.get("lora_dropout") or 0.0),
        targets="^(" + "|".join(re.escape(m) for m in sorted(found)) + ")$",
        base_quantization=base_quantization)

    stored = checkpoint.stored_param_dtypes(base_path)
    with checkpoint.ModelWriter(output_dir, config, overwrite=overwrite) as writer:
        for path, spec in specs.items():
            module = path.rsplit("/", 1)[0]
            if path in whole:
                writer.add(path, whole[path].astype(stored[path]))
                continue
            value = checkpoint.load_param_leaf(base_path, path, spec.shape, stored[path])
            if module not in found or not path.endswith("/kernel"):
                writer.add(path, value)
                continue
            if base_quantization == "none":
                writer.add(path, value)
            else:
                codes, scale = lora.quantize_kernel(jnp.asarray(value), base_quantization)
                writer.add(f"{module}/kernel_codes", np.asarray(codes))
                writer.add(f"{module}/kernel_scale", np.asarray(scale))
            for which, leaf in (("A", "lora_a"), ("B", "lora_b")):
                writer.add(f"{module}/{leaf}", _stack_layers(found[module][which], spec, which,
                                                             rank, module))
        checkpoint.write_lora_config(writer.stage, adapters)
        tokenizer = base_path / checkpoint.TOKENIZER_DIR
        return writer.finish(tokenizer_dir=tokenizer if tokenizer.is_dir() else None)


def _stack_layers(per_layer: dict[int, np.ndarray], spec: mapping.ParamSpec, which: str,
                  rank: int, module: str) -> np.ndarray:
    """Per-layer adapter matrices -> our stacked leaf; absent layers are zeros (no update)."""
    fan_in, fan_out = spec.shape[-2:]
    shape = (fan_in, rank) if which == "A" else (rank, fan_out)
    if not spec.stacked:
        return per_layer[0]
    missing = [i for i in range(spec.shape[0]) if i not in per_layer]
    if missing:
        log.warning("%s: the adapter has no lora_%s for layers %s; they get zeros", module,
                    which, missing)
    return np.stack([per_layer.get(i, np.zeros(shape, np.float32))
                     for i in range(spec.shape[0])])
