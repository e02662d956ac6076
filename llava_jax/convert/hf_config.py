"""Model configs: transformers' `LlavaConfig` / original LLaVA + CLIP configs <-> ours."""

from __future__ import annotations

from typing import Any

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig


class ConfigError(ValueError):
    """A config.json we cannot represent faithfully."""


def _rope(text: dict[str, Any], source: str) -> tuple[float, float | None]:
    """(rope_theta, linear scaling factor or None) from a llama config dict of any vintage."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    rope_type = (scaling.get("rope_type") or scaling.get("type")
                 or params.get("rope_type") or "default")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        factor = scaling.get("factor", params.get("factor"))
        return float(theta), float(factor)
    raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported "
                      "(supported: default, linear).")


def text_config_from_llama(text: dict[str, Any], source: str) -> TextConfig:
    """A `LlamaConfig` dict -> TextConfig."""
    if text.get("model_type", "llama") not in ("llama", "llava_llama", "llava"):
        raise ConfigError(f"{source}: text model_type {text.get('model_type')!r} is not a LLaMA "
                          "model; only LLaMA/Vicuna decoders are supported.")
    theta, scaling = _rope(text, source)
    num_heads = text.get("num_attention_heads", 32)
    return TextConfig(
        vocab_size=text.get("vocab_size", 32000),
        hidden_size=text.get("hidden_size", 4096),
        intermediate_size=text.get("intermediate_size", 11008),
        num_layers=text.get("num_hidden_layers", 32),
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        head_dim=text.get("head_dim"),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        max_position_embeddings=text.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        hidden_act=text.get("hidden_act", "silu"),
    )


def vision_config_from_clip(vision: dict[str, Any], source: str) -> VisionConfig:
    """A `CLIPVisionConfig` dict (or a `CLIPConfig` with vision_config) -> VisionConfig."""
    if "vision_config" in vision:  # CLIPModel config
        vision = vision["vision_config"]
    if vision.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ConfigError(f"{source}: vision model_type {vision.get('model_type')!r} is not CLIP.")
    return VisionConfig(
        hidden_size=vision.get("hidden_size", 768),
        intermediate_size=vision.get("intermediate_size", 3072),
        num_layers=vision.get("num_hidden_layers", 12),
        num_heads=vision.get("num_attention_heads", 12),
        image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 32),
        num_channels=vision.get("num_channels", 3),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
        hidden_act=vision.get("hidden_act", "quick_gelu"),
    )


def from_hf_llava(config: dict[str, Any], source: str = "config.json") -> LlavaConfig:
    """transformers `LlavaConfig` dict -> LlavaConfig."""
    if config.get("model_type") != "llava":
        raise ConfigError(f"{source}: model_type is {config.get('model_type')!r}, expected 'llava' "
                          "(a LlavaForConditionalGeneration directory). For the original LLaVA "
                          "layout use `llava-to-jax`.")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: projector_hidden_act={config['projector_hidden_act']!r}; "
                          "only exact 'gelu' is supported.")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{source}: vision_feature_select_strategy={strategy!r} is unknown.")
    text = text_config_from_llama(config.get("text_config") or {}, source)
    if "tie_word_embeddings" in config:
        text = text.__class__(**{**text.__dict__, "tie_word_embeddings": bool(config["tie_word_embeddings"])})
    layer = config.get("vision_feature_layer", -2)
    return LlavaConfig(
        vision=vision_config_from_clip(config.get("vision_config") or {}, source),
        text=text,
        projector_type="mlp2x_gelu",
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy="patch" if strategy == "default" else "cls_patch",
        image_token_index=config.get("image_token_index", config.get("image_token_id", 32000)),
        pad_token_id=config.get("pad_token_id", (config.get("text_config") or {}).get("pad_token_id")),
        bos_token_id=(config.get("text_config") or {}).get("bos_token_id", 1),
        eos_token_id=(config.get("text_config") or {}).get("eos_token_id", 2),
    )


def from_original_llava(config: dict[str, Any], clip_config: dict[str, Any], *,
                        vocab_size: int, image_token_index: int, pad_token_id: int,
                        projector_type: str | None = None, source: str = "config.json") -> LlavaConfig:
    """Original `LlavaLlamaForCausalLM` config + CLIP config -> LlavaConfig.

    `vocab_size` is the padded vocabulary after adding `<image>` and `<pad>`.
    """
    # A head missing from the checkpoint is cloned from the embeddings (as transformers'
    # conversion does), so the result is always untied.
    text = text_config_from_llama({**config, "model_type": "llama", "vocab_size": vocab_size,
                                   "tie_word_embeddings": False}, source)
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"{source}: mm_vision_select_feature={select!r} is unknown.")
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ConfigError(f"{source}: mm_patch_merge_type={merge!r} (LLaVA-1.6 'anyres') is not "
                          "supported; only 'flat' (LLaVA / LLaVA-1.5).")
    aspect = config.get("image_aspect_ratio", "square")
    return LlavaConfig(
        vision=vision_config_from_clip(clip_config, source),
        text=text,
        projector_type=projector_type or config.get("mm_projector_type", "linear"),
        vision_feature_layer=config.get("mm_vision_select_layer", -1),
        vision_feature_select_strategy=select,
        image_token_index=image_token_index,
        pad_token_id=pad_token_id,
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        image_aspect="pad" if aspect == "pad" else "square",
    )


def to_hf_llava(config: LlavaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """LlavaConfig -> a transformers `LlavaConfig` dict (written as config.json)."""
    import transformers  # only here: it takes seconds to import, and only export needs it

    if config.projector_type != "mlp2x_gelu":
        raise ConfigError(f"projector_type={config.projector_type!r} has no transformers "
                          "equivalent: LlavaForConditionalGeneration's projector is mlp2x_gelu.")
    text, vision = config.text, config.vision
    rope_scaling = (None if text.rope_scaling_factor is None
                    else {"rope_type": "linear", "factor": text.rope_scaling_factor})
    text_config = transformers.LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads,
        head_dim=text.resolved_head_dim, rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings, attention_bias=text.attention_bias,
        mlp_bias=text.mlp_bias, hidden_act=text.hidden_act, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
        image_size=vision.image_size, patch_size=vision.patch_size,
        num_channels=vision.num_channels, layer_norm_eps=vision.layer_norm_eps,
        hidden_act=vision.hidden_act)
    layer = config.vision_feature_layer
    hf = transformers.LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=config.image_token_index, projector_hidden_act="gelu",
        vision_feature_select_strategy=(
            "default" if config.vision_feature_select_strategy == "patch" else "full"),
        vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
        image_seq_length=config.num_image_tokens,
        multimodal_projector_bias=config.projector_bias,
        tie_word_embeddings=text.tie_word_embeddings, pad_token_id=config.pad_token_id)
    out = hf.to_dict()
    out["architectures"] = ["LlavaForConditionalGeneration"]
    out["torch_dtype"] = torch_dtype
    return out
