"""LoRA / QLoRA: low-rank adapters on a frozen (optionally int8 / nf4 quantized) base.

    y = x @ W + (alpha / rank) * (dropout(x) @ A) @ B        A: [in, rank], B: [rank, out]

`apply_lora(model, lora_config)` replaces the `Dense` modules whose path matches
`lora_config.targets` by `LoraDense` modules in place. Parameter paths of the base stay as
they were (`.../q_proj/kernel`); each adapted module gains `lora_a` and `lora_b`
(`nnx.LoRAParam`), and with `base_quantization` its `kernel` is replaced by `kernel_codes` +
`kernel_scale`. Stacked decoder layers keep their leading [layers] axis on every new leaf, so
scanned and unrolled layers, remat and the stacked checkpoint layout work unchanged.
A = U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), B = 0: at initialisation
the adapted model computes exactly what the base does.

Quantization is qwix's (`qwix.quantize` / `qwix.dequantize`): int8 with one absmax scale per
output channel, nf4 (QLoRA's NormalFloat4) with one absmax scale per block of 64 inputs of
an output channel. nf4 codes are stored two per byte (uint8), so a checkpoint holds
0.5 byte + 1/16 float32 scale per weight whatever the backend does with uint4 arrays.

Why not qwix's own LoRA provider: it intercepts jnp.einsum inside `__call__` and creates the
adapters on the module it finds on the Python stack. Our decoder runs its layers through
`layers.run_stacked` (split the stacked module, merge one layer slice per step of a scan or
loop), so adapters created there would live on a temporary per-layer module, without the
[layers] axis, and be lost; measured: `qwix.apply_lora_to_model` on the tiny LlavaModel
raises IndexError in run_stacked (BUILD_NOTES.md, "LoRA and QLoRA").

Pure model code: no I/O. Conversion to and from PEFT lives in convert/adapters.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax import tree
from llava_jax.models.layers import Dense, matmul

Array = jax.Array

# The original recipe (peft target modules of LLaVA's finetune_lora.sh): every linear layer
# of the LLM's decoder layers; not the LM head, the vision tower or the projector.
DEFAULT_TARGETS = r"^language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$"
QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCK_SIZE = 64  # inputs per nf4 scale (bitsandbytes' QLoRA default)
# Trainable leaves of a LoRA run: the adapters and the (fully trained) projector.
ADAPTER_LEAVES = r"/lora_[ab]$"
LORA_TRAINABLE = r"(^multi_modal_projector/|/lora_[ab]$)"
# Modules LoRA must not target: the LM head is read as a table (LlamaModel.logits), not
# called, and the projector trains fully.
_UNTARGETABLE = re.compile(r"(^|/)lm_head$|^multi_modal_projector(/|$)")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What is adapted and how (recorded as lora_config.json beside a LoRA checkpoint)."""

    rank: int
    alpha: float
    dropout: float = 0.0  # on the adapters' input, while training only
    targets: str = DEFAULT_TARGETS  # regex searched in module paths ("language_model/layers/...")
    base_quantization: str = "none"  # storage of the adapted modules' frozen kernels

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1 (0 turns LoRA off)")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if self.base_quantization not in QUANTIZATIONS:
            raise ValueError(f"lora.base_quantization={self.base_quantization!r}: use one of "
                             f"{QUANTIZATIONS}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets={self.targets!r}: not a regex ({e})") from e

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown LoRA config fields {sorted(unknown)}")
        return cls(**fields)


# ----- quantization of frozen kernels (qwix) -----

def _qwix():
    import qwix  # imported on use: plain LoRA and inference on merged models do not need it

    return qwix


def quantize_kernel(kernel: Array, kind: str) -> tuple[Array, Array]:
    """kernel [..., in, out] -> (codes, scale).

    int8: codes int8 [..., in, out], scale float32 [..., 1, out] (absmax per output channel).
    nf4: codes uint8 [..., in / 2, out] (two 4-bit codes a byte, along `in`), scale float32
    [..., in / 64, out] (absmax per block of 64 inputs). Leading (stacked-layer) dims are
    quantized one slice at a time, which bounds the temporaries to one layer's.
    """
    if kind not in ("int8", "nf4"):
        raise ValueError(f"base_quantization={kind!r}: use 'int8' or 'nf4'")
    fan_in = kernel.shape[-2]
    if kind == "nf4" and fan_in % NF4_BLOCK_SIZE:
        raise ValueError(f"nf4 needs input widths divisible by {NF4_BLOCK_SIZE}; a kernel of "
                         f"shape {kernel.shape} has {fan_in} (use base_quantization='int8')")
    qwix = _qwix()

    def one(matrix):  # [in, out]
        if kind == "int8":
            q = qwix.quantize(matrix.astype(jnp.float32), jnp.int8, channelwise_axes=(1,))
            return q.qvalue, q.scale
        q = qwix.quantize(matrix.astype(jnp.float32), "nf4", channelwise_axes=(1,),
                          tiled_axes={0: NF4_BLOCK_SIZE})
        codes = q.qvalue.astype(jnp.uint8).reshape(fan_in // 2, 2, -1)
        return codes[:, 0] | (codes[:, 1] << 4), q.scale

    if kernel.ndim == 2:
        return one(kernel)
    lead = kernel.shape[:-2]
    codes, scale = jax.lax.map(one, kernel.reshape(-1, *kernel.shape[-2:]))
    return codes.reshape(*lead, *codes.shape[1:]), scale.reshape(*lead, *scale.shape[1:])


def dequantize_kernel(codes: Array, scale: Array, kind: str, dtype=jnp.float32) -> Array:
    """The inverse of `quantize_kernel`: [..., in, out] in `dtype`."""
    qwix = _qwix()
    if kind == "int8":
        qtype, qvalue = jnp.int8, codes
    elif kind == "nf4":
        pairs = jnp.stack([codes & 0x0F, codes >> 4], axis=-2)  # [..., in / 2, 2, out]
        qvalue = pairs.reshape(*codes.shape[:-2], codes.shape[-2] * 2, codes.shape[-1])
        qtype, qvalue = "nf4", qvalue.astype(jnp.uint4)
    else:
        raise ValueError(f"base_quantization={kind!r}: use 'int8' or 'nf4'")
    value = qwix.dequantize(qwix.QArray(qvalue, scale.astype(jnp.float32), None, qtype))
    return value.astype(dtype)


def quantization_error_bound(kernel: Array, kind: str) -> Array:
    """Largest |kernel - dequantize(quantize(kernel))| the format allows, per element.

    int8: half a step, scale / 2 with scale = absmax / 127.5 (qwix's symmetric bound).
    nf4: half the widest gap between adjacent NF4 levels (0.3038 / 2 of the unit range),
    times the block's absmax.
    """
    k = jnp.abs(kernel.astype(jnp.float32))
    if kind == "int8":
        return jnp.max(k, axis=-2, keepdims=True) / 127.5 / 2
    blocks = k.reshape(*k.shape[:-2], k.shape[-2] // NF4_BLOCK_SIZE, NF4_BLOCK_SIZE, k.shape[-1])
    levels = _qwix()._src.core.numerics.get_nf4_buckets()
    half_gap = jnp.max(jnp.diff(levels)) / 2
    absmax = jnp.max(blocks, axis=-2, keepdims=True)
    return jnp.broadcast_to(absmax * half_gap, blocks.shape).reshape(k.shape)


# ----- dropout on the adapters' input -----

_DROPOUT_KEY: contextvars.ContextVar[Array | None] = contextvars.ContextVar("lora_dropout",
                                                                            default=None)


@contextlib.contextmanager
def dropout_key(key: Array | None):
    """Turns LoRA dropout on for the block (training), with masks drawn from `key`.

    Enter it inside the traced function. Without it (inference, export) dropout is off. The
    mask differs per key (the train step folds in the step and micro-batch) and per adapted
    module; inside a scan over stacked layers the same mask pattern is used by every layer.
    """
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


# ----- the adapted layer -----

def init_adapter(key: Array, kernel_shape, rank: int, dtype) -> tuple[Array, Array]:
    """(A [..., in, rank] ~ U(+-1/sqrt(in)), B [..., rank, out] = 0) for a kernel [..., in, out]."""
    *lead, fan_in, fan_out = kernel_shape
    bound = 1.0 / (fan_in ** 0.5)
    lora_a = jax.random.uniform(key, (*lead, fan_in, rank), jnp.float32, -bound, bound)
    return lora_a.astype(dtype), jnp.zeros((*lead, rank, fan_out), dtype)


class LoraDense(nnx.Module):
    """A `Dense` with a frozen base kernel (plain, or int8 / nf4 codes) plus a LoRA update."""

    def __init__(self, dense: Dense, config: LoraConfig, *, path: str, key: Array,
                 adapter_dtype=None):
        kernel = dense.kernel[...]
        adapter_dtype = adapter_dtype or kernel.dtype
        lora_a, lora_b = init_adapter(key, kernel.shape, config.rank, adapter_dtype)
        self.lora_a = nnx.LoRAParam(lora_a)
        self.lora_b = nnx.LoRAParam(lora_b)
        self.quantization = config.base_quantization
        if self.quantization == "none":
            self.kernel = dense.kernel
        else:
            codes, scale = quantize_kernel(kernel, self.quantization)
            self.kernel = None
            self.kernel_codes = nnx.Param(codes)
            self.kernel_scale = nnx.Param(scale)
        self.bias = dense.bias
        self.dtype = dense.dtype
        self.scaling = config.scaling
        self.dropout = config.dropout
        self.dropout_salt = zlib.crc32(path.encode())  # a distinct mask per adapted module

    def base_kernel(self, dtype) -> Array:
        """The frozen kernel [..., in, out] in `dtype` (dequantized when stored quantized)."""
        if self.quantization == "none":
            return self.kernel[...].astype(dtype)
        return dequantize_kernel(self.kernel_codes[...], self.kernel_scale[...],
                                 self.quantization, dtype)

    def __call__(self, x: Array) -> Array:
        """x: [..., in] -> [..., out] in the compute dtype."""
        lead = "abcdefgh"[:x.ndim - 1]
        x = x.astype(self.dtype)
        y = matmul(f"{lead}i,io->{lead}o", x, self.base_kernel(self.dtype))
        adapter_in = x
        key = _DROPOUT_KEY.get()
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.dropout_salt),
                                        1.0 - self.dropout, x.shape)
            adapter_in = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(self.dtype)
        down = matmul(f"{lead}i,ir->{lead}r", adapter_in, self.lora_a[...].astype(self.dtype))
        up = matmul(f"{lead}r,ro->{lead}o", down.astype(self.dtype),
                    self.lora_b[...].astype(self.dtype))
        y = y + self.scaling * up
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# ----- applying and merging -----

def _module_path(path) -> str:
    return "/".join(str(p) for p in path)


def target_modules(model: nnx.Module, config: LoraConfig) -> list[str]:
    """Paths of the Dense modules `config.targets` adapts, sorted; a clear error if none."""
    regex = re.compile(config.targets)
    found = []
    for path, module in nnx.iter_modules(model):
        name = _module_path(path)
        if isinstance(module, (Dense, LoraDense)) and regex.search(name):
            if _UNTARGETABLE.search(name):
                raise ValueError(f"lora.targets={config.targets!r} matches {name!r}: the LM head "
                                 "and the projector cannot take adapters (the projector trains "
                                 "fully in a LoRA run)")
            found.append(name)
    if not found:
        raise ValueError(f"lora.targets={config.targets!r} matches no Dense module (paths look "
                         "like 'language_model/layers/self_attn/q_proj')")
    return sorted(found)


def apply_lora(model: nnx.Module, config: LoraConfig, *, seed: int = 0,
               adapter_dtype=None) -> list[str]:
    """Replaces the targeted Dense modules of `model` by LoraDense, in place.

    The i-th target (in sorted path order) draws its A from fold_in(key(seed), i).
    adapter_dtype: dtype of A and B (default: the base kernel's). Returns the adapted paths.
    """
    paths = target_modules(model, config)
    base_key = jax.random.key(seed)
    for index, name in enumerate(paths):
        *parents, leaf = name.split("/")
        parent = model
        for part in parents:
            parent = getattr(parent, part)
        dense = getattr(parent, leaf)
        if isinstance(dense, LoraDense):
            raise ValueError(f"{name} already has LoRA adapters")
        setattr(parent, leaf, LoraDense(dense, config, path=name,
                                        key=jax.random.fold_in(base_key, index),
                                        adapter_dtype=adapter_dtype))
    return paths


def adapted_modules(params: dict) -> list[str]:
    """Module paths holding adapters in a parameter dict, sorted."""
    return sorted(path[:-len("/lora_a")] for path in tree.flatten(params)
                  if path.endswith("/lora_a"))


def merged_kernel(module_params: dict, config: LoraConfig, dtype=jnp.float32) -> Array:
    """W + (alpha / rank) A @ B of one adapted module's leaves, computed in float32.

    module_params: {"lora_a", "lora_b", and "kernel" or "kernel_codes" + "kernel_scale"}.
    """
    if "kernel" in module_params:
        base = jnp.asarray(module_params["kernel"]).astype(jnp.float32)
    else:
        base = dequantize_kernel(jnp.asarray(module_params["kernel_codes"]),
                                 jnp.asarray(module_params["kernel_scale"]),
                                 config.base_quantization)
    delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(module_params["lora_a"], jnp.float32),
                       jnp.asarray(module_params["lora_b"], jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (base + config.scaling * delta).astype(dtype)


def merge_params(params: dict, config: LoraConfig, dtype=None) -> dict:
    """A LoRA parameter dict -> the plain model's dict, adapters folded into the kernels.

    dtype: of the merged kernels (default: the adapters' dtype); other leaves are unchanged.
    """
    flat = dict(tree.flatten(params))
    for module in adapted_modules(params):
        leaves = {name: flat.pop(f"{module}/{name}") for name in
                  ("lora_a", "lora_b", "kernel", "kernel_codes", "kernel_scale")
                  if f"{module}/{name}" in flat}
        flat[f"{module}/kernel"] = merged_kernel(leaves, config,
                                                 dtype or jnp.asarray(leaves["lora_a"]).dtype)
    return tree.unflatten(flat)


# ----- whole models -----

def lora_model(config, lora_config: LoraConfig, seed: int = 0):
    """A random LlavaModel (seed) with adapters (A from `seed`, B = 0) on its targets."""
    from llava_jax.models.config import jnp_dtype
    from llava_jax.models.llava import create_model

    model = create_model(config, seed)
    apply_lora(model, lora_config, seed=seed, adapter_dtype=jnp_dtype(config.param_dtype))
    return model


def abstract_lora_params(config, lora_config: LoraConfig) -> tuple[nnx.GraphDef, dict]:
    """(graph definition, nested dict of ShapeDtypeStructs) of the adapted model, nothing
    allocated. Float leaves in `config.param_dtype`, except the float32 quantization scales;
    quantized codes keep their integer dtype."""
    from llava_jax.models.config import jnp_dtype

    model = nnx.eval_shape(lambda: lora_model(config, lora_config))
    graphdef, _ = nnx.split(model)
    dtype = jnp_dtype(config.param_dtype)

    def leaf(key_path, x):
        name = tree.flat_path(key_path)
        if name.endswith("/kernel_codes"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        if name.endswith("/kernel_scale"):
            return jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jax.ShapeDtypeStruct(x.shape, dtype)

    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return graphdef, jax.tree_util.tree_map_with_path(leaf, state)
