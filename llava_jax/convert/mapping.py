"""Parameter names: our flax paths <-> transformers' LLaVA tensor names, and layout normalisation.

Canonical torch names are those `LlavaForConditionalGeneration.save_pretrained` writes
(`language_model.model.layers.N.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.linear_k.*`). Every other layout we read (transformers' newer
`model.language_model.*`, the original LLaVA `model.layers.*` + `model.mm_projector.{0,2}`,
a CLIP checkpoint's `vision_model.*`) is renamed to canonical names first.

Our parameters are stacked over layers: one torch tensor per layer maps to one slice
[layer] of our array.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
from flax import nnx

from llava_jax.models.config import LlavaConfig
from llava_jax.tree import flatten, unflatten


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One of our parameters and the torch tensors it is made of.

    path: our flat path ('language_model/layers/self_attn/q_proj/kernel').
    shape: our full shape (with the leading [layers] axis for stacked parameters).
    torch_names: one name (unstacked) or one per layer (stacked).
    to_ours / to_torch: array layout transforms for one (per-layer) tensor.
    """

    path: str
    shape: tuple[int, ...]
    torch_names: tuple[str, ...]
    stacked: bool
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _conv_to_ours(x):  # torch [out, in, kh, kw] -> [kh, kw, in, out]
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def _conv_to_torch(x):
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def _torch_leaf_name(path: str) -> tuple[str, Callable, Callable]:
    """'a/b/kernel' -> ('a.b.weight', transform in, transform out)."""
    *modules, leaf = path.split("/")
    if leaf == "kernel":
        return ".".join(modules + ["weight"]), _transpose, _transpose
    return ".".join(modules + [_LEAF[leaf]]), _identity, _identity


def _torch_prefix(path: str) -> tuple[str, str, bool]:
    """Splits our path into (torch prefix, rest of our path, stacked?)."""
    rules = [
        ("language_model/layers/", "language_model.model.layers.{i}.", True),
        ("language_model/lm_head/", "language_model.lm_head.", False),
        ("language_model/", "language_model.model.", False),
        ("vision_tower/layers/", "vision_tower.vision_model.encoder.layers.{i}.", True),
        ("vision_tower/pre_layernorm/", "vision_tower.vision_model.pre_layrnorm.", False),
        ("vision_tower/post_layernorm/", "vision_tower.vision_model.post_layernorm.", False),
        ("vision_tower/head/", "vision_tower.vision_model.head.", False),  # SigLIP's pooling head
        ("vision_tower/", "vision_tower.vision_model.embeddings.", False),
        ("multi_modal_projector/", "multi_modal_projector.", False),
    ]
    for ours, theirs, stacked in rules:
        if path.startswith(ours):
            return theirs, path[len(ours):], stacked
    raise KeyError(f"No torch name rule for parameter {path!r}")


def param_specs(config: LlavaConfig, param_shapes: dict[str, tuple[int, ...]]) -> list[ParamSpec]:
    """Specs for every parameter of a model with this config.

    Args:
      config: the model config (layer counts).
      param_shapes: our flat path -> shape (from `flat_param_shapes(abstract_model(config))`).
    """
    specs = []
    for path, shape in param_shapes.items():
        if path == "image_newline":  # LLaVA-NeXT / OneVision: one vector at the top level
            specs.append(ParamSpec(path, tuple(shape), ("image_newline",), False, _identity,
                                   _identity))
            continue
        prefix, rest, stacked = _torch_prefix(path)
        if prefix == "vision_tower.vision_model.embeddings.":
            # Embedding-level tensors of CLIP.
            name = {"class_embedding": "class_embedding",
                    "patch_embedding": "patch_embedding.weight",
                    "patch_bias": "patch_embedding.bias",  # SigLIP's conv has a bias
                    "position_embedding": "position_embedding.weight"}[rest]
            to_ours, to_torch = ((_conv_to_ours, _conv_to_torch) if rest == "patch_embedding"
                                 else (_identity, _identity))
            specs.append(ParamSpec(path, tuple(shape), (prefix + name,), False, to_ours, to_torch))
            continue
        if path.startswith("vision_tower/layers/fc"):
            rest = "mlp/" + rest  # torch CLIPEncoderLayer keeps fc1/fc2 under .mlp
        if rest == "probe":
            specs.append(ParamSpec(path, tuple(shape), (prefix + "probe",), False, _identity,
                                   _identity))
            continue
        if rest.startswith("attention/in_proj/"):
            # torch.nn.MultiheadAttention's fused in_proj_weight [3w, w] / in_proj_bias [3w].
            leaf = "in_proj_weight" if rest.endswith("kernel") else "in_proj_bias"
            transform = _transpose if rest.endswith("kernel") else _identity
            specs.append(ParamSpec(path, tuple(shape), (prefix + "attention." + leaf,), False,
                                   transform, transform))
            continue
        leaf, to_ours, to_torch = _torch_leaf_name(rest)
        if stacked:
            names = tuple(prefix.format(i=i) + leaf for i in range(shape[0]))
        else:
            names = (prefix + leaf,)
        specs.append(ParamSpec(path, tuple(shape), names, stacked, to_ours, to_torch))
    return specs


def flat_param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Our flat path -> shape for every nnx.Param of a (possibly abstract) model."""
    return {path: tuple(leaf.shape) for path, leaf in flatten_params(model).items()}


def flatten_params(model) -> dict:
    """Our flat path -> array (or ShapeDtypeStruct) for every nnx.Param of a model."""
    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ----- layouts on disk -> canonical names -----

# Tensors that carry no weights (buffers) or belong to parts LLaVA does not use.
_IGNORED = re.compile(
    r"(\.rotary_emb\.inv_freq$|\.position_ids$|^text_model\.|^visual_projection\.|"
    r"^text_projection\.|^logit_scale$)")


def canonical_hf_name(name: str) -> str | None:
    """transformers LLaVA (old or new key layout) -> canonical name; None for ignored tensors."""
    if _IGNORED.search(name):
        return None
    if name == "model.image_newline":  # transformers 5's module path of LLaVA-NeXT's newline
        return "image_newline"
    for old, new in (("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        # transformers 5 writes CLIP without the `vision_model.` level.
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def canonical_llava_name(name: str) -> str | None:
    """Original LLaVA (`LlavaLlamaForCausalLM`) state-dict name -> canonical name."""
    if _IGNORED.search(name):
        return None
    match = re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", name)
    if match:  # Sequential indices 0, 2, 4 (GELUs in between) -> linear_1, linear_2, ...
        return f"multi_modal_projector.linear_{int(match.group(1)) // 2 + 1}.{match.group(2)}"
    match = re.fullmatch(r"mm_projector\.(\d+)\.(weight|bias)", name)  # stripped prefix
    if match:
        return f"multi_modal_projector.linear_{int(match.group(1)) // 2 + 1}.{match.group(2)}"
    if name in ("model.image_newline", "image_newline"):  # LLaVA-1.6's learned newline
        return "image_newline"
    if name.startswith("model.vision_tower.vision_tower."):
        return "vision_tower." + name[len("model.vision_tower.vision_tower."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model."):
        return "language_model.model." + name[len("model."):]
    return name


def original_projector_name(canonical: str) -> str:
    """`multi_modal_projector.linear_k.X` -> the original `model.mm_projector.{2(k-1)}.X`."""
    match = re.fullmatch(r"multi_modal_projector\.linear_(\d+)\.(weight|bias)", canonical)
    if not match:
        raise KeyError(f"{canonical!r} is not a projector tensor name")
    return f"model.mm_projector.{2 * (int(match.group(1)) - 1)}.{match.group(2)}"


def canonical_clip_name(name: str) -> str | None:
    """`CLIPVisionModel` / `CLIPModel` name -> canonical name (text tower ignored)."""
    if _IGNORED.search(name):
        return None
    if name.startswith("vision_model."):
        return "vision_tower." + name
    if name.split(".")[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm"):
        return "vision_tower.vision_model." + name  # transformers 5 writes no `vision_model.`
    return name


def torch_tensors(model) -> dict[str, np.ndarray]:
    """An in-memory LlavaModel -> {canonical torch name: array} (for tests and small models)."""
    flat = {path: np.asarray(value) for path, value in flatten_params(model).items()}
    specs = param_specs(model.config, {path: value.shape for path, value in flat.items()})
    out = {}
    for spec in specs:
        array = flat[spec.path]
        for i, name in enumerate(spec.torch_names):
            out[name] = spec.to_torch(array[i] if spec.stacked else array)
    return out


# Canonical (safetensors) prefix -> transformers 5 module prefix (`named_modules()` of
# LlavaForConditionalGeneration: what PEFT adapter keys and target_modules are spelled in).
TRANSFORMERS_MODULE_PREFIXES = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.vision_model.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "image_newline": "model.image_newline",
}


def transformers_module_name(canonical: str) -> str:
    """A canonical tensor name's transformers 5 module-path spelling (same suffix)."""
    for old, new in TRANSFORMERS_MODULE_PREFIXES.items():
        if canonical.startswith(old):
            return new + canonical[len(old):]
    raise KeyError(f"no transformers module prefix for {canonical!r}")
