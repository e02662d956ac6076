"""Model configs: transformers' `LlavaConfig` / original LLaVA + CLIP configs <-> ours.

Text configs: `LlamaConfig` (Vicuna, LLaMA-2, Llama-3/3.1), `MistralConfig`, `Qwen2Config`;
vision configs: `CLIPVisionConfig`, `SiglipVisionConfig`. A value we cannot compute faithfully
(another rope type, partial rotary, Qwen2's per-layer sliding window, ...) is a ConfigError
naming the field, never a silently different model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from llava_jax.models.config import (ROPE_SCALING_TYPES, VISION_MODEL_TYPES, LlavaConfig,
                                     TextConfig, VisionConfig)


class ConfigError(ValueError):
    """A config.json we cannot represent faithfully."""


def _rope(text: dict[str, Any], source: str) -> dict[str, Any]:
    """TextConfig rope fields from a text config dict of any vintage (`rope_theta` +
    `rope_scaling`, or transformers 5's `rope_parameters`)."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported.")
    merged = {**params, **scaling}
    theta = merged.get("rope_theta", text.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    partial = merged.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial} is not supported "
                          "(rotary over the whole head only).")
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return fields
    if rope_type not in ROPE_SCALING_TYPES:
        raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported "
                          f"(supported: default, {', '.join(ROPE_SCALING_TYPES)}); field "
                          "rope_scaling / rope_parameters.rope_type.")
    if merged.get("factor") is None:
        raise ConfigError(f"{source}: rope scaling {rope_type!r} without a 'factor'.")
    fields.update(rope_scaling_type=rope_type, rope_scaling_factor=float(merged["factor"]))
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if merged.get(key) is None:
                raise ConfigError(f"{source}: llama3 rope scaling needs rope_scaling.{key}.")
        original = merged.get("original_max_position_embeddings")
        fields.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                      rope_high_freq_factor=float(merged["high_freq_factor"]),
                      rope_original_max_position_embeddings=(
                          None if original is None else int(original)))
    return fields


# text model_type (transformers' and the original layouts') -> our decoder family.
_TEXT_FAMILIES = {"llama": "llama", "llava_llama": "llama", "llava": "llama",
                  "mistral": "mistral", "llava_mistral": "mistral",
                  "qwen2": "qwen2", "llava_qwen": "qwen2"}
# transformers' defaults where the families differ (a config.json may omit any field).
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048,
                  num_key_value_heads=None),
    "mistral": dict(vocab_size=32000, intermediate_size=14336, max_position_embeddings=131072,
                    num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                  num_key_value_heads=32),
}


def _sliding_window(text: dict[str, Any], family: str, num_layers: int, source: str):
    """Our sliding_window (None or an int) for the family's fields, or a ConfigError."""
    layer_types = text.get("layer_types")
    if family == "mistral":
        # MistralForCausalLM applies config.sliding_window to every layer (layer_types unused).
        window = text.get("sliding_window", _TEXT_DEFAULTS["mistral"]["sliding_window"])
        return None if window is None else int(window)
    if family == "qwen2":
        sliding = text.get("use_sliding_window", False) and text.get("sliding_window") is not None
        if sliding and text.get("max_window_layers", 28) < num_layers:
            raise ConfigError(f"{source}: use_sliding_window=true with max_window_layers="
                              f"{text.get('max_window_layers', 28)} < num_hidden_layers="
                              f"{num_layers} (sliding attention on some layers only) is not "
                              "supported.")
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        raise ConfigError(f"{source}: layer_types={sorted(set(layer_types))} (per-layer "
                          f"attention kinds) is not supported for a {family} decoder.")
    return None


def text_config_from_hf(text: dict[str, Any], source: str) -> TextConfig:
    """A `LlamaConfig` / `MistralConfig` / `Qwen2Config` dict -> TextConfig."""
    model_type = text.get("model_type", "llama")
    if model_type not in _TEXT_FAMILIES:
        raise ConfigError(f"{source}: text_config.model_type={model_type!r} is not supported; "
                          "supported decoders: llama, mistral, qwen2.")
    family = _TEXT_FAMILIES[model_type]
    defaults = _TEXT_DEFAULTS[family]
    get = lambda key, fallback=None: text.get(key, defaults.get(key, fallback))
    if text.get("pretraining_tp", 1) not in (None, 1):
        raise ConfigError(f"{source}: pretraining_tp={text['pretraining_tp']} is not supported.")
    num_heads = get("num_attention_heads", 32)
    num_layers = get("num_hidden_layers", 32)
    biases = {}
    if family == "llama":
        biases = dict(attention_bias=bool(text.get("attention_bias", False)),
                      mlp_bias=bool(text.get("mlp_bias", False)))
    elif family == "qwen2":
        biases = dict(qkv_bias=True)  # Qwen2Attention: q/k/v with bias, o_proj without
    return TextConfig(
        model_type=family,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size", 4096),
        intermediate_size=get("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=get("num_key_value_heads") or num_heads,
        head_dim=text.get("head_dim"),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        hidden_act=text.get("hidden_act", "silu"),
        sliding_window=_sliding_window(text, family, num_layers, source),
        **_rope(text, source),
        **biases,
    )


def text_config_from_llama(text: dict[str, Any], source: str) -> TextConfig:
    """A `LlamaConfig` dict -> TextConfig (kept for callers of the LLaMA-only name)."""
    return text_config_from_hf(text, source)


def vision_config_from_clip(vision: dict[str, Any], source: str) -> VisionConfig:
    """A `CLIPVisionConfig` / `SiglipVisionConfig` dict (or a `CLIPConfig` / `SiglipConfig`
    with vision_config) -> VisionConfig; the tower is chosen by its model_type."""
    if "vision_config" in vision:  # CLIPModel / SiglipModel config
        vision = vision["vision_config"]
    model_type = vision.get("model_type", "clip_vision_model")
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(
        model_type, model_type)
    if model_type not in VISION_MODEL_TYPES:
        raise ConfigError(f"{source}: vision_config.model_type={vision.get('model_type')!r} is "
                          f"not supported; supported towers: {sorted(VISION_MODEL_TYPES)}.")
    siglip = model_type == "siglip_vision_model"
    if vision.get("hidden_act", VISION_MODEL_TYPES[model_type]) != VISION_MODEL_TYPES[model_type]:
        raise ConfigError(f"{source}: vision_config.hidden_act={vision['hidden_act']!r}; a "
                          f"{model_type} tower here uses {VISION_MODEL_TYPES[model_type]!r}.")
    return VisionConfig(
        model_type=model_type,
        hidden_size=vision.get("hidden_size", 768),
        intermediate_size=vision.get("intermediate_size", 3072),
        num_layers=vision.get("num_hidden_layers", 12),
        num_heads=vision.get("num_attention_heads", 12),
        image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 16 if siglip else 32),
        num_channels=vision.get("num_channels", 3),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
        hidden_act=VISION_MODEL_TYPES[model_type],
        use_head=bool(vision.get("vision_use_head", True)) if siglip else True,
    )


# transformers model_type -> (architecture, its defaults where they differ from LlavaConfig's).
HF_FAMILIES = {
    "llava": ("LlavaForConditionalGeneration",
              dict(vision_feature_select_strategy="default", vision_feature_layer=-2,
                   image_token_index=32000)),
    "llava_next": ("LlavaNextForConditionalGeneration",
                   dict(vision_feature_select_strategy="default", vision_feature_layer=-2,
                        image_token_index=32000,
                        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                              [336, 1008]])),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration",
                        dict(vision_feature_select_strategy="full", vision_feature_layer=-1,
                             image_token_index=151646, vision_aspect_ratio="anyres_max_9",
                             image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7)
                                                   for j in range(1, 7)])),
}


def _layout_fields(config: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """image_aspect / image_grid_pinpoints / mm_patch_merge_type of a transformers config."""
    if model_type == "llava":
        return {}
    defaults = HF_FAMILIES[model_type][1]
    pinpoints = _pinpoint_pairs(
        config.get("image_grid_pinpoints") or defaults["image_grid_pinpoints"], source)
    aspect = "anyres"
    if model_type == "llava_onevision":
        aspect = config.get("vision_aspect_ratio", defaults["vision_aspect_ratio"])
        if not isinstance(aspect, str) or re.fullmatch(r"anyres_max_[1-9]\d*", aspect) is None:
            raise ConfigError(f"{source}: vision_aspect_ratio={aspect!r} is not supported; "
                              "only 'anyres_max_N' (N >= 1).")
    return dict(image_aspect=aspect, image_grid_pinpoints=pinpoints,
                mm_patch_merge_type="spatial_unpad")


def from_hf_llava(config: dict[str, Any], source: str = "config.json") -> LlavaConfig:
    """transformers `LlavaConfig` / `LlavaNextConfig` / `LlavaOnevisionConfig` dict ->
    LlavaConfig."""
    model_type = config.get("model_type")
    if original_kind(config) is not None:
        raise ConfigError(f"{source}: an original LLaVA layout ({original_kind(config)}, "
                          f"architectures {config.get('architectures')}); convert it with "
                          "`llava-to-jax --input DIR --vision-tower TOWER_DIR`.")
    if model_type not in HF_FAMILIES:
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected one of "
                          f"{sorted(HF_FAMILIES)} (a LlavaForConditionalGeneration, "
                          "LlavaNextForConditionalGeneration or "
                          "LlavaOnevisionForConditionalGeneration directory). For the original "
                          "LLaVA layout use `llava-to-jax`.")
    defaults = HF_FAMILIES[model_type][1]
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: projector_hidden_act={config['projector_hidden_act']!r}; "
                          "only exact 'gelu' is supported.")
    strategy = config.get("vision_feature_select_strategy",
                          defaults["vision_feature_select_strategy"])
    if strategy not in ("default", "full"):
        raise ConfigError(f"{source}: vision_feature_select_strategy={strategy!r} is unknown.")
    text = text_config_from_hf(config.get("text_config") or {}, source)
    if config.get("tie_word_embeddings"):
        # transformers' LlavaConfig ties when either level says so (its __post_init__ lifts a
        # text config's True to the top level).
        text = dataclasses.replace(text, tie_word_embeddings=True)
    layer = config.get("vision_feature_layer", defaults["vision_feature_layer"])
    try:
        return LlavaConfig(
            vision=vision_config_from_clip(config.get("vision_config") or {}, source),
            text=text,
            projector_type="mlp2x_gelu",
            projector_bias=bool(config.get("multimodal_projector_bias", True)),
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy="patch" if strategy == "default" else "cls_patch",
            image_token_index=config.get("image_token_index",
                                         config.get("image_token_id",
                                                    defaults["image_token_index"])),
            pad_token_id=config.get("pad_token_id",
                                    (config.get("text_config") or {}).get("pad_token_id")),
            bos_token_id=(config.get("text_config") or {}).get("bos_token_id", 1),
            eos_token_id=(config.get("text_config") or {}).get("eos_token_id", 2),
            **_layout_fields(config, model_type, source),
        )
    except ConfigError:
        raise
    except ValueError as e:  # LlavaConfig's validation names the field
        raise ConfigError(f"{source}: {e}") from e


# The original layouts' architectures -> our name for them. Released configs do not say it in
# model_type reliably: liuhaotian's v1.5 and v1.6 Vicuna/34B say "llava" (the name transformers'
# own LLaVA later took), v1.6 Mistral "llava_mistral", lmms-lab's OneVision "llava_qwen" or
# "qwen2"; their `architectures` always name the class.
ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llava_llama",
                          "LlavaMistralForCausalLM": "llava_mistral",
                          "LlavaQwenForCausalLM": "llava_qwen"}


def original_kind(config: dict[str, Any]) -> str | None:
    """'llava_llama' / 'llava_mistral' / 'llava_qwen' for an original-layout LLaVA config
    (by its architectures, else its model_type), None for anything else (model_type 'llama':
    a plain LLaMA / Vicuna, whatever its architectures say)."""
    if config.get("model_type") == "llama":
        return None
    for architecture in config.get("architectures") or ():
        if architecture in ORIGINAL_ARCHITECTURES:
            return ORIGINAL_ARCHITECTURES[architecture]
    model_type = config.get("model_type")
    if model_type in ORIGINAL_ARCHITECTURES.values():
        return model_type
    if model_type == "llava" and "text_config" not in config and "mm_vision_tower" in config:
        return "llava_llama"  # an original config without architectures
    return None


def from_original_llava(config: dict[str, Any], clip_config: dict[str, Any], *,
                        vocab_size: int, image_token_index: int, pad_token_id: int,
                        projector_type: str | None = None, source: str = "config.json") -> LlavaConfig:
    """Original `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` config (LLaVA-1.5, or
    LLaVA-1.6 with image_aspect_ratio 'anyres') + CLIP config -> LlavaConfig.

    `vocab_size` is the padded vocabulary after adding `<image>` and `<pad>`.
    """
    # A head missing from the checkpoint is cloned from the embeddings (as transformers'
    # conversion does), so the result is always untied.
    model_type = original_kind(config)
    decoder = {"llava_mistral": "mistral", "llava_qwen": "qwen2"}.get(model_type, "llama")
    text = text_config_from_hf({**config, "model_type": decoder, "vocab_size": vocab_size,
                                "tie_word_embeddings": False}, source)
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"{source}: mm_vision_select_feature={select!r} is unknown.")
    merge = config.get("mm_patch_merge_type", "flat")
    aspect = config.get("image_aspect_ratio", "square")
    vision = vision_config_from_clip(clip_config, source)
    onevision = model_type == "llava_qwen" and isinstance(aspect, str) and \
        re.fullmatch(r"anyres_max_[1-9]\d*", aspect) is not None
    if aspect == "anyres" or onevision:  # LLaVA-1.6 (liuhaotian), OneVision (lmms-lab)
        if merge != "spatial_unpad":
            raise ConfigError(f"{source}: mm_patch_merge_type={merge!r} with image_aspect_ratio="
                              f"{aspect!r} is not supported; only 'spatial_unpad'.")
        if config.get("mm_newline_position", "grid") != "grid":  # images use "grid"
            raise ConfigError(f"{source}: mm_newline_position="
                              f"{config['mm_newline_position']!r} is not supported; only "
                              "'grid' (a newline after each feature-grid row).")
        layout = dict(image_aspect=aspect, mm_patch_merge_type="spatial_unpad",
                      image_grid_pinpoints=_original_pinpoints(
                          config.get("image_grid_pinpoints"), vision.image_size, source))
    elif isinstance(aspect, str) and aspect.startswith("anyres"):
        raise ConfigError(f"{source}: image_aspect_ratio={aspect!r} is not supported in the "
                          "original layout; 'anyres' (LLaVA-1.6), 'anyres_max_N' (llava_qwen, "
                          "OneVision), 'pad' or 'square'.")
    elif merge != "flat":
        raise ConfigError(f"{source}: mm_patch_merge_type={merge!r} is only supported with "
                          "image_aspect_ratio='anyres' ('spatial_unpad', LLaVA-1.6); flat "
                          "models use 'flat'.")
    else:
        layout = dict(image_aspect="pad" if aspect == "pad" else "square")
    layer = config.get("mm_vision_select_layer", -1)
    if vision.model_type == "siglip_vision_model":
        # LLaVA-NeXT's SigLIP tower returns its last kept layer's output, every token (no class
        # token), whatever mm_vision_select_layer says; llava-hf's OneVision: -1, "full".
        layer, select = -1, "cls_patch"
    return LlavaConfig(
        vision=vision,
        text=text,
        projector_type=projector_type or config.get("mm_projector_type", "linear"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=select,
        image_token_index=image_token_index,
        pad_token_id=pad_token_id,
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        **layout,
    )


def _original_pinpoints(pinpoints, tile: int, source: str) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints as [[h, w], ...], or LLaVA-NeXT's training shorthand
    "(1x1),...,(6x6)": every grid from the first to the last, in tiles of `tile` pixels."""
    if isinstance(pinpoints, str):
        match = re.fullmatch(r"\((\d+)x(\d+)\),\.\.\.,\((\d+)x(\d+)\)", pinpoints.replace(" ", ""))
        if match:
            (a, b, c, d) = map(int, match.groups())
            return tuple((tile * i, tile * j) for i in range(a, c + 1) for j in range(b, d + 1))
    return _pinpoint_pairs(pinpoints, source, " (or '(1x1),...,(NxM)')")


def _pinpoint_pairs(pinpoints, source: str, also: str = "") -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints [[h, w], ...] as int pairs; anything else fails naming the field."""
    try:
        return tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: image_grid_pinpoints={pinpoints!r} is not a list of "
                          f"[height, width] pairs{also}.") from e


def _rope_parameters(text: TextConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for our rope fields."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": text.rope_theta}
    if text.rope_scaling_factor is None:
        return params
    params.update(rope_type=text.rope_scaling_type, factor=text.rope_scaling_factor)
    if text.rope_scaling_type == "llama3":
        params.update(low_freq_factor=text.rope_low_freq_factor,
                      high_freq_factor=text.rope_high_freq_factor,
                      original_max_position_embeddings=(
                          text.rope_original_max_position_embeddings
                          or text.max_position_embeddings))
    return params


def hf_text_config(config: LlavaConfig):
    """The transformers text config (LlamaConfig / MistralConfig / Qwen2Config) of our decoder;
    ConfigError for a switch combination that family cannot express."""
    import transformers

    text = config.text
    family = text.model_type
    unsupported = []
    if family != "llama":
        unsupported += [f"text.{name}=True" for name in ("attention_bias", "mlp_bias")
                        if getattr(text, name)]
    if family != "qwen2" and text.qkv_bias:
        unsupported.append("text.qkv_bias=True")
    if family == "qwen2" and not text.qkv_bias:
        unsupported.append("text.qkv_bias=False (Qwen2 always has q/k/v biases)")
    if family != "mistral" and text.sliding_window is not None:
        unsupported.append(f"text.sliding_window={text.sliding_window}")
    if family == "qwen2" and text.head_dim not in (None, text.hidden_size // text.num_heads):
        unsupported.append(f"text.head_dim={text.head_dim} (Qwen2: hidden_size // num_heads)")
    if unsupported:
        raise ConfigError(f"text.model_type={family!r} has no transformers equivalent with "
                          + ", ".join(unsupported) + ".")
    common = dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads,
        rms_norm_eps=text.rms_norm_eps, rope_parameters=_rope_parameters(text),
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings, hidden_act=text.hidden_act,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    if family == "llama":
        return transformers.LlamaConfig(head_dim=text.resolved_head_dim,
                                        attention_bias=text.attention_bias,
                                        mlp_bias=text.mlp_bias, **common)
    if family == "mistral":
        return transformers.MistralConfig(head_dim=text.resolved_head_dim,
                                          sliding_window=text.sliding_window, **common)
    return transformers.Qwen2Config(use_sliding_window=False, **common)


def hf_vision_config(vision: VisionConfig):
    """The transformers vision config (CLIPVisionConfig / SiglipVisionConfig)."""
    import transformers

    common = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                  num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                  image_size=vision.image_size, patch_size=vision.patch_size,
                  num_channels=vision.num_channels, layer_norm_eps=vision.layer_norm_eps,
                  hidden_act=vision.hidden_act)
    if vision.model_type == "siglip_vision_model":
        return transformers.SiglipVisionConfig(vision_use_head=vision.use_head, **common)
    return transformers.CLIPVisionConfig(**common)


def to_hf_llava(config: LlavaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """LlavaConfig -> a transformers config dict (written as config.json): `LlavaConfig` for
    flat models, `LlavaNextConfig` for 'anyres', `LlavaOnevisionConfig` for 'anyres_max_N'."""
    import transformers  # only here: it takes seconds to import, and only export needs it

    if config.projector_type != "mlp2x_gelu":
        raise ConfigError(f"projector_type={config.projector_type!r} has no transformers "
                          "equivalent: LlavaForConditionalGeneration's projector is mlp2x_gelu.")
    layer = config.vision_feature_layer
    common = dict(
        vision_config=hf_vision_config(config.vision), text_config=hf_text_config(config),
        image_token_index=config.image_token_index, projector_hidden_act="gelu",
        vision_feature_select_strategy=(
            "default" if config.vision_feature_select_strategy == "patch" else "full"),
        vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
        multimodal_projector_bias=config.projector_bias,
        tie_word_embeddings=config.text.tie_word_embeddings, pad_token_id=config.pad_token_id)
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    if not config.anyres:
        hf = transformers.LlavaConfig(image_seq_length=config.num_image_tokens, **common)
        architecture = "LlavaForConditionalGeneration"
    elif config.image_aspect == "anyres":
        hf = transformers.LlavaNextConfig(image_grid_pinpoints=pinpoints,
                                          image_seq_length=config.num_image_tokens, **common)
        architecture = "LlavaNextForConditionalGeneration"
    else:
        hf = transformers.LlavaOnevisionConfig(image_grid_pinpoints=pinpoints,
                                               vision_aspect_ratio=config.image_aspect, **common)
        architecture = "LlavaOnevisionForConditionalGeneration"
    out = hf.to_dict()
    out["architectures"] = [architecture]
    out["torch_dtype"] = torch_dtype
    return out
