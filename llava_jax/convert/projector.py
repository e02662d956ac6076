"""The stage-1 projector in the original LLaVA's file format: `mm_projector.{bin,safetensors}`.

The original's stage 1 saves only the projector, as `model.mm_projector.{0,2}.{weight,bias}`
(torch Linear layout), and its stage 2 reads that file with `--pretrain_mm_mlp_adapter`.
Training reads such a file into the `multi_modal_projector` sub-tree of our parameters
(`read_projector`) and writes one at the end of stage 1 (`write_projector`), so a projector
moves between the two code bases in either direction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from llava_jax import tree
from llava_jax.convert import mapping
from llava_jax.convert.tensors import TensorReader, write_safetensors
from llava_jax.models.config import LlavaConfig

PROJECTOR_FILE = "mm_projector.safetensors"
PREFIX = "multi_modal_projector/"


def _projector_specs(model_config: LlavaConfig, projector: dict):
    """(leaf path inside the projector sub-tree, conversion spec) for every projector leaf."""
    shapes = {PREFIX + path: value.shape for path, value in tree.flatten(projector).items()}
    return [(spec.path.removeprefix(PREFIX), spec)
            for spec in mapping.param_specs(model_config, shapes)]


def read_projector(source: str, model_config: LlavaConfig, abstract_projector: dict,
                   shardings: dict) -> dict:
    """The `multi_modal_projector` sub-tree from an original `mm_projector` file.

    Args:
      source: `mm_projector.bin` or `.safetensors` (the original's stage-1 output, or ours).
      abstract_projector: ShapeDtypeStructs of the sub-tree (the dtype to load in).
      shardings: NamedShardings of the sub-tree (where each array goes).
    Raises:
      ValueError naming the tensor when one is missing or has the wrong shape.
    """
    reader = TensorReader(source, mapping.canonical_llava_name)
    flat_abstract, flat_shardings = tree.flatten(abstract_projector), tree.flatten(shardings)
    out = {}
    for leaf, spec in _projector_specs(model_config, abstract_projector):
        (name,) = spec.torch_names
        if name not in reader:
            raise ValueError(f"config.model.projector={source!r}: no tensor for {name} "
                             f"(has {reader.names()[:6]})")
        value = spec.to_ours(reader.get(name))
        if value.shape != spec.shape:
            raise ValueError(f"config.model.projector: {name} has shape {value.shape}, the "
                             f"model needs {spec.shape}")
        out[leaf] = jax.device_put(value.astype(flat_abstract[leaf].dtype), flat_shardings[leaf])
    return tree.unflatten(out)


def write_projector(params: dict, model_config: LlavaConfig, directory: str) -> str:
    """Writes `params["multi_modal_projector"]` as the original stage-1 output.

    DIRECTORY/mm_projector.safetensors (`model.mm_projector.{0,2}.*`, float32) and a
    config.json naming the projector type and sizes. Returns the safetensors path.
    """
    projector = params["multi_modal_projector"]
    flat = tree.flatten(projector)
    tensors = {}
    for leaf, spec in _projector_specs(model_config, projector):
        value = np.asarray(jax.device_get(flat[leaf]), np.float32)
        (name,) = spec.torch_names
        tensors[mapping.original_projector_name(name)] = spec.to_torch(value)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROJECTOR_FILE)
    write_safetensors(Path(path), tensors)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump({"mm_projector_type": model_config.projector_type,
                   "mm_hidden_size": model_config.projector_input_size,
                   "hidden_size": model_config.text.hidden_size}, handle, indent=2)
    return path
