"""Model configuration: plain frozen dataclasses, presets, dict round trip.

A `LlavaConfig` fully describes the architecture (what the weights mean) plus the
compute knobs that do not change the weights (dtypes, scan, remat). It is stored as JSON
inside every checkpoint, so a checkpoint is self-describing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

PROJECTOR_TYPES_HELP = "'linear', 'identity' or 'mlp{N}x_gelu' (e.g. 'mlp2x_gelu')"
SELECT_STRATEGIES = ("patch", "cls_patch")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
# Decoder attention kernels (models/attention.py); a runtime choice, not part of the weights.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
# Vision towers by transformers' vision model_type (models/clip.py, models/siglip.py).
VISION_MODEL_TYPES = {"clip_vision_model": "quick_gelu", "siglip_vision_model": "gelu_pytorch_tanh"}
# Decoders by transformers' text model_type: one module (models/llama.py) with switches.
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")
# transformers' rope_type values we compute ('default' is rope_scaling_factor=None).
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT vision tower: transformers' `CLIPVisionConfig` or `SiglipVisionConfig`."""

    model_type: str = "clip_vision_model"  # or 'siglip_vision_model' (VISION_MODEL_TYPES)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x); SigLIP: 'gelu_pytorch_tanh'
    # SigLIP only: the tower has its attention-pooling head (held for export, never computed).
    use_head: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        """CLIP prepends a class token; SigLIP has none."""
        return self.model_type == "clip_vision_model"

    @property
    def num_positions(self) -> int:
        """Tokens the tower's layers see: patches (+ the class token)."""
        return self.num_patches + int(self.has_class_token)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-style decoder: transformers' `LlamaConfig`, `MistralConfig` or `Qwen2Config`."""

    model_type: str = "llama"  # 'llama', 'mistral' or 'qwen2' (TEXT_MODEL_TYPES): the export class
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads: grouped-query attention
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # None: plain rotary; else scaled per rope_scaling_type
    rope_scaling_type: str = "linear"  # 'linear', 'dynamic' (NTK) or 'llama3' (ROPE_SCALING_TYPES)
    rope_low_freq_factor: float = 1.0  # llama3 scaling only
    rope_high_freq_factor: float = 4.0  # llama3 scaling only
    rope_original_max_position_embeddings: int | None = None  # llama3: pre-extension context
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (LLaMA's switch)
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Mistral: query i sees key j only if 0 <= i - j < sliding_window (None: full causal).
    sliding_window: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The whole LLaVA model: vision tower, projector, decoder, and how they connect."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    # Which CLIP hidden state feeds the projector: an index into the num_layers + 1 hidden
    # states (0 = embeddings after pre-layernorm; negative counts from the end), or a tuple
    # of such indices concatenated on the feature axis (as transformers allows).
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "patch"  # 'patch' drops CLS; 'cls_patch' keeps it
    image_token_index: int = 32000
    pad_token_id: int | None = 32001
    bos_token_id: int = 1
    eos_token_id: int = 2
    # How images are preprocessed: 'pad' or 'square' (one tile: LLaVA / LLaVA-1.5), or tiled
    # (data/anyres.py): 'anyres' (LLaVA-NeXT) or 'anyres_max_N' (OneVision: the unpadded
    # feature grid is shrunk to about N tiles' worth).
    image_aspect: str = "pad"
    # Tiled modes only: candidate ((height, width), ...) resolutions, multiples of
    # vision.image_size (transformers' image_grid_pinpoints).
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # How an image's features are laid out: 'flat' (one tile's tokens) or 'spatial_unpad' (the
    # tiled modes: base tile, then the unpadded grid with a learned `image_newline` ending
    # each row).
    mm_patch_merge_type: str = "flat"
    # Compute knobs: change how the weights are used, never what they are.
    param_dtype: str = "float32"
    dtype: str = "float32"  # activations / matmul inputs
    scan_layers: bool = True  # lax.scan over stacked layers (fast compile) vs an unrolled loop
    remat_policy: str = "none"
    # Decoder attention: 'auto' (splash on TPU, cudnn on NVIDIA GPUs, xla / chunked on CPU),
    # 'xla' (reference), 'chunked' (memory-efficient, any backend), 'cudnn', 'splash'.
    attention: str = "auto"

    def __post_init__(self):
        validate(self)

    # ----- derived quantities -----
    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: the tower's tokens, less the first for 'patch'.

        As transformers' "default" strategy, 'patch' drops the first token whatever it is:
        CLIP's class token, or (SigLIP has none) the first patch."""
        drop = 1 if self.vision_feature_select_strategy == "patch" else 0
        return self.vision.num_positions - drop

    @property
    def anyres(self) -> bool:
        """Images are tiled (image_aspect 'anyres' / 'anyres_max_N')."""
        return self.mm_patch_merge_type == "spatial_unpad"

    @property
    def max_tiles(self) -> int:
        """Tile slots one image can need in a tiled mode: the base tile plus the largest grid
        of image_grid_pinpoints (1 for the flat modes)."""
        if not self.anyres:
            return 1
        size = self.vision.image_size
        return 1 + max((h // size) * (w // size) for h, w in self.image_grid_pinpoints)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layers = self.vision_feature_layer
        return tuple(layers) if isinstance(layers, (tuple, list)) else (layers,)

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    @property
    def projector_depth(self) -> int:
        """Number of linear layers in the projector (0 for identity)."""
        return parse_projector_type(self.projector_type)

    def replace(self, **changes) -> "LlavaConfig":
        """Returns a copy with top-level fields changed; `vision`/`text` take dicts too."""
        for key in ("vision", "text"):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        return dataclasses.replace(self, **changes)

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.vision_feature_layer, tuple):
            out["vision_feature_layer"] = list(self.vision_feature_layer)
        out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlavaConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown LlavaConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        vision = VisionConfig(**data.pop("vision", {}))
        text = TextConfig(**data.pop("text", {}))
        if isinstance(data.get("vision_feature_layer"), list):
            data["vision_feature_layer"] = tuple(data["vision_feature_layer"])
        if "image_grid_pinpoints" in data:
            data["image_grid_pinpoints"] = tuple(tuple(p) for p in data["image_grid_pinpoints"])
        return cls(vision=vision, text=text, **data)


def parse_projector_type(projector_type: str) -> int:
    if projector_type == "identity":
        return 0
    if projector_type == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ValueError(
        f"projector_type={projector_type!r} is not supported; use {PROJECTOR_TYPES_HELP}."
    )


def validate(config: LlavaConfig) -> None:
    """Raises ValueError naming the field for any inconsistent setting."""
    vision, text = config.vision, config.text
    depth = parse_projector_type(config.projector_type)
    if depth == 0 and config.projector_input_size != text.hidden_size:
        raise ValueError(
            f"projector_type='identity' needs vision feature size ({config.projector_input_size}) "
            f"== text.hidden_size ({text.hidden_size})."
        )
    if config.vision_feature_select_strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
            f"use one of {SELECT_STRATEGIES}."
        )
    if not config.feature_layers:
        raise ValueError("vision_feature_layer must name at least one layer.")
    for layer in config.feature_layers:
        if not -(vision.num_layers + 1) <= layer <= vision.num_layers:
            raise ValueError(
                f"vision_feature_layer={layer} is out of range for a {vision.num_layers}-"
                f"layer tower (valid: {-(vision.num_layers + 1)}..{vision.num_layers})."
            )
    # image_size need not be a multiple of patch_size: the patch convolution is 'valid' and
    # ignores the last image_size % patch_size rows and columns (SigLIP: 384 px, patch 14).
    if vision.patch_size > vision.image_size or vision.patch_size < 1:
        raise ValueError(f"vision.patch_size={vision.patch_size} must be in "
                         f"1..vision.image_size={vision.image_size}.")
    if vision.hidden_size % vision.num_heads:
        raise ValueError("vision.hidden_size must be divisible by vision.num_heads.")
    if text.num_heads % text.num_kv_heads:
        raise ValueError(
            f"text.num_heads={text.num_heads} must be a multiple of "
            f"text.num_kv_heads={text.num_kv_heads}."
        )
    if text.head_dim is None and text.hidden_size % text.num_heads:
        raise ValueError("text.hidden_size must be divisible by text.num_heads (or set head_dim).")
    if text.resolved_head_dim % 2:
        raise ValueError("text head_dim must be even for rotary embeddings.")
    if vision.model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"vision.model_type={vision.model_type!r}; use one of "
                         f"{sorted(VISION_MODEL_TYPES)}.")
    if vision.hidden_act != VISION_MODEL_TYPES[vision.model_type]:
        raise ValueError(
            f"vision.hidden_act={vision.hidden_act!r}; {vision.model_type} towers use "
            f"{VISION_MODEL_TYPES[vision.model_type]!r}.")
    if text.model_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"text.model_type={text.model_type!r}; use one of {TEXT_MODEL_TYPES}.")
    if text.rope_scaling_factor is not None:
        if text.rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"text.rope_scaling_type={text.rope_scaling_type!r}; use one of "
                             f"{ROPE_SCALING_TYPES}.")
        if not text.rope_scaling_factor > 0:
            raise ValueError(f"text.rope_scaling_factor={text.rope_scaling_factor} must be > 0.")
        if text.rope_scaling_type == "llama3" and not (
                text.rope_high_freq_factor > text.rope_low_freq_factor > 0):
            raise ValueError("text.rope_high_freq_factor must exceed text.rope_low_freq_factor "
                             "(> 0) for llama3 rope scaling.")
    if text.sliding_window is not None and text.sliding_window < 1:
        raise ValueError(f"text.sliding_window={text.sliding_window}; use None or >= 1.")
    if text.hidden_act != "silu":
        raise ValueError(f"text.hidden_act={text.hidden_act!r}; only 'silu' (LLaMA) is supported.")
    if not 0 <= config.image_token_index < text.vocab_size:
        raise ValueError(
            f"image_token_index={config.image_token_index} is outside the vocabulary "
            f"(text.vocab_size={text.vocab_size})."
        )
    for name in ("param_dtype", "dtype"):
        if getattr(config, name) not in DTYPES:
            raise ValueError(f"{name}={getattr(config, name)!r}; use one of {DTYPES}.")
    if config.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={config.remat_policy!r}; use one of {REMAT_POLICIES}.")
    if config.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention={config.attention!r}; use one of {ATTENTION_IMPLEMENTATIONS}.")
    _validate_layout(config)


MERGE_TYPES = ("flat", "spatial_unpad")


def _validate_layout(config: LlavaConfig) -> None:
    """image_aspect, image_grid_pinpoints and mm_patch_merge_type agree."""
    aspect = config.image_aspect
    tiled = aspect == "anyres" or re.fullmatch(r"anyres_max_[1-9]\d*", aspect) is not None
    if aspect not in ("pad", "square") and not tiled:
        raise ValueError(f"image_aspect={aspect!r}; use 'pad', 'square', 'anyres' or "
                         "'anyres_max_N' (N >= 1).")
    if config.mm_patch_merge_type not in MERGE_TYPES:
        raise ValueError(f"mm_patch_merge_type={config.mm_patch_merge_type!r}; use one of "
                         f"{MERGE_TYPES}.")
    if tiled != (config.mm_patch_merge_type == "spatial_unpad"):
        raise ValueError(f"mm_patch_merge_type={config.mm_patch_merge_type!r} does not go with "
                         f"image_aspect={aspect!r}: tiled modes ('anyres', 'anyres_max_N') use "
                         "'spatial_unpad', 'pad' / 'square' use 'flat'.")
    if not tiled:
        if config.image_grid_pinpoints:
            raise ValueError(f"image_grid_pinpoints are set but image_aspect={aspect!r} does "
                             "not tile; use 'anyres' or 'anyres_max_N', or leave them empty.")
        return
    size = config.vision.image_size
    if not config.image_grid_pinpoints:
        raise ValueError(f"image_aspect={aspect!r} needs image_grid_pinpoints.")
    for pinpoint in config.image_grid_pinpoints:
        if (len(pinpoint) != 2 or any(not isinstance(v, int) or v < size or v % size
                                      for v in pinpoint)):
            raise ValueError(f"image_grid_pinpoints entry {list(pinpoint)} must be [height, "
                             f"width], positive multiples of vision.image_size={size}.")
    side = size // config.vision.patch_size
    if config.num_image_tokens != side * side:
        raise ValueError(
            f"image_aspect={aspect!r} lays tile features out on a {side}x{side} grid, but "
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} gives "
            f"{config.num_image_tokens} tokens per tile (CLIP: use 'patch'; SigLIP: "
            "'cls_patch').")


# ----- presets -----

_CLIP_L_224 = VisionConfig(image_size=224)
_CLIP_L_336 = VisionConfig(image_size=336)
_LLAMA_7B = TextConfig()
_LLAMA_13B = TextConfig(
    hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
)

# Released decoders (their config.json values; parameter counts in tests/test_models_families.py).
_LLAMA_3_8B = TextConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                         max_position_embeddings=8192)
_LLAMA_3_70B = dataclasses.replace(_LLAMA_3_8B, hidden_size=8192, intermediate_size=28672,
                                   num_layers=80, num_heads=64)
_LLAMA_3_1 = dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192,
                  max_position_embeddings=131072)
_MISTRAL_7B_V01 = TextConfig(model_type="mistral", vocab_size=32000, hidden_size=4096,
                             intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                             max_position_embeddings=32768, sliding_window=4096)
_QWEN2 = dict(model_type="qwen2", qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=32768)
TEXT_PRESETS: dict[str, TextConfig] = {
    "llama-3-8b": _LLAMA_3_8B,
    "llama-3-70b": _LLAMA_3_70B,
    "llama-3.1-8b": dataclasses.replace(_LLAMA_3_8B, **_LLAMA_3_1),
    "llama-3.1-70b": dataclasses.replace(_LLAMA_3_70B, **_LLAMA_3_1),
    "mistral-7b-v0.1": _MISTRAL_7B_V01,
    # v0.2 (the LLM of llava-v1.6-mistral-7b): rope_theta 1e6, no sliding window.
    "mistral-7b-v0.2": dataclasses.replace(_MISTRAL_7B_V01, rope_theta=1000000.0,
                                           sliding_window=None),
    # The small Qwen2 models tie the LM head to the embeddings.
    "qwen2-0.5b": TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                             num_layers=24, num_heads=14, num_kv_heads=2,
                             tie_word_embeddings=True, **_QWEN2),
    "qwen2-1.5b": TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                             num_layers=28, num_heads=12, num_kv_heads=2,
                             tie_word_embeddings=True, **_QWEN2),
    "qwen2-7b": TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                           num_layers=28, num_heads=28, num_kv_heads=4, **_QWEN2),
    "qwen2-72b": TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                            num_layers=80, num_heads=64, num_kv_heads=8, **_QWEN2),
}
# SigLIP-so400m/14 at 384 px as LLaVA-OneVision / LLaVA-Interleave use it: the original drops
# the last of its 27 layers and the pooling head, and llava-hf's conversions keep 26 layers.
_SIGLIP_SO400M_384 = VisionConfig(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_layers=26,
    num_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh", use_head=False)


def _llava_on(text: TextConfig, *, extra_tokens: int, pad: int | None, bos: int, eos: int,
              vision: VisionConfig = _CLIP_L_336, **changes) -> LlavaConfig:
    """A LLaVA-1.5-recipe model over `text`: `<image>` at the tokenizer's first free id.

    extra_tokens: rows the embedding table grows by (0 when it has spare rows, as Qwen2's).
    """
    tokenizer_size = text.vocab_size if extra_tokens else changes.pop("tokenizer_size")
    vocab = -(-(text.vocab_size + extra_tokens) // 64) * 64 if extra_tokens else text.vocab_size
    return LlavaConfig(vision=vision, text=dataclasses.replace(text, vocab_size=vocab),
                       image_token_index=tokenizer_size, pad_token_id=pad, bos_token_id=bos,
                       eos_token_id=eos, **changes)


PRESETS: dict[str, LlavaConfig] = {
    # LLaVA v1: Vicuna v1 (LLaMA-1: 2048 positions, eps 1e-6), CLIP-L/14 224 px, linear projector.
    "llava-v1-7b": LlavaConfig(
        vision=_CLIP_L_224,
        projector_type="linear",
        image_aspect="square",
        text=dataclasses.replace(_LLAMA_7B, rms_norm_eps=1e-6, max_position_embeddings=2048),
    ),
    "llava-v1-13b": LlavaConfig(
        vision=_CLIP_L_224,
        projector_type="linear",
        image_aspect="square",
        text=dataclasses.replace(_LLAMA_13B, rms_norm_eps=1e-6, max_position_embeddings=2048),
    ),
    # LLaVA-1.5: Vicuna v1.5 (Llama 2), CLIP-L/14 336 px, 2-layer GELU MLP projector.
    "llava-v1.5-7b": LlavaConfig(vision=_CLIP_L_336, text=_LLAMA_7B),
    "llava-v1.5-13b": LlavaConfig(vision=_CLIP_L_336, text=_LLAMA_13B),
    # LLaVA-1.5's recipe (CLIP-L/14 336 px, mlp2x_gelu) over newer decoders. Llama 3 and
    # Mistral get <image> and <pad> appended (vocabulary padded to a multiple of 64, as
    # llava-hf's conversions); eos is the chat end-of-turn token the templates stop on.
    "llava-llama-3-8b": _llava_on(_LLAMA_3_8B, extra_tokens=2, pad=128257, bos=128000,
                                  eos=128009),
    "llava-llama-3.1-8b": _llava_on(TEXT_PRESETS["llama-3.1-8b"], extra_tokens=2, pad=128257,
                                    bos=128000, eos=128009),
    "llava-mistral-7b": _llava_on(TEXT_PRESETS["mistral-7b-v0.2"], extra_tokens=2, pad=32001,
                                  bos=1, eos=2),
    # SigLIP + Qwen2 (the LLaVA-OneVision / Interleave pairing, single-image flat here):
    # Qwen2's table has spare rows, so <image> is id 151646 (after <|im_end|>) without
    # resizing; features from the last kept layer, all 729 tokens.
    "llava-qwen2-0.5b": _llava_on(TEXT_PRESETS["qwen2-0.5b"], extra_tokens=0, pad=151643,
                                  bos=151643, eos=151645, tokenizer_size=151646,
                                  vision=_SIGLIP_SO400M_384, vision_feature_layer=-1,
                                  vision_feature_select_strategy="cls_patch"),
    "llava-qwen2-7b": _llava_on(TEXT_PRESETS["qwen2-7b"], extra_tokens=0, pad=151643,
                                bos=151643, eos=151645, tokenizer_size=151646,
                                vision=_SIGLIP_SO400M_384, vision_feature_layer=-1,
                                vision_feature_select_strategy="cls_patch"),
}
# LLaVA-NeXT (liuhaotian llava-v1.6-*, llava-hf *-next-*) and LLaVA-OneVision (lmms-lab, llava-hf
# llava-onevision-qwen2-*): the flat models above with tiled images, as their configs say.
_NEXT = dict(image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
             image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))
_ONEVISION = dict(image_aspect="anyres_max_9", mm_patch_merge_type="spatial_unpad",
                  image_grid_pinpoints=tuple((384 * i, 384 * j) for i in range(1, 7)
                                             for j in range(1, 7)))
PRESETS |= {
    "llava-v1.6-vicuna-7b": PRESETS["llava-v1.5-7b"].replace(**_NEXT),
    "llava-v1.6-vicuna-13b": PRESETS["llava-v1.5-13b"].replace(**_NEXT),
    "llava-v1.6-mistral-7b": PRESETS["llava-mistral-7b"].replace(**_NEXT),
    "llama3-llava-next-8b": PRESETS["llava-llama-3-8b"].replace(**_NEXT),
    "llava-onevision-qwen2-0.5b": PRESETS["llava-qwen2-0.5b"].replace(**_ONEVISION),
    "llava-onevision-qwen2-7b": PRESETS["llava-qwen2-7b"].replace(**_ONEVISION),
    # Tests and the CPU demo: every feature of the big models at toy width.
    "tiny": LlavaConfig(
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_layers=3,
            num_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text=TextConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=1024,
        ),
        image_token_index=510,
        pad_token_id=511,
    ),
}
# The tiny model with LLaVA-NeXT's tiling: 32 px tiles, grids up to 2 x 2.
PRESETS["tiny-next"] = PRESETS["tiny"].replace(
    image_aspect="anyres", mm_patch_merge_type="spatial_unpad",
    image_grid_pinpoints=((32, 64), (64, 32), (64, 64)))


def get_preset(name: str, **overrides) -> LlavaConfig:
    """Returns a preset config by name, with optional top-level overrides."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; available: {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides)


def jnp_dtype(name: str):
    """Maps a dtype name from the config to a numpy/jax dtype."""
    import jax.numpy as jnp  # local: keep this module importable without jax

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def count_from_shapes(shapes) -> int:
    """Sum of element counts over an iterable of shapes."""
    return int(sum(int(np.prod(shape)) for shape in shapes))
