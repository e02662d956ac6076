"""The training config: every field with its default and a one-line comment, and validation.

configs/pretrain.py, finetune.py and demo.py start from `default_config(stage)` and change
what their recipe needs; `validate_config` fails at start-up naming the bad field.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from llava_jax import sharding
from llava_jax.data import default_data_config, validate_data_config
from llava_jax.models import lora
from llava_jax.models.config import DTYPES, REMAT_POLICIES
from llava_jax.training import optim


def default_config(stage: int = 2) -> ml_collections.ConfigDict:
    """Every field of a single training stage, with its default (presets edit a copy)."""
    c = ml_collections.ConfigDict()
    c.stage = stage  # 1: pretrain the projector; 2: instruction-tune projector + LLM
    c.trainable = ""  # regex on parameter paths that train; '' = the stage's LLaVA default
    c.seed = 0  # data order and random initialisation
    c.max_steps = -1  # stop (with a checkpoint) after this step; -1 = train to the end
    c.distributed = "auto"  # jax.distributed.initialize(): 'auto' | 'yes' | 'no'
    c.loss_chunk_size = 512  # LM head + loss in sequence chunks of this size (0 = at once)
    # The LM head runs only on target tokens when no row has more than this fraction of them
    # (the same loss, fewer FLOPs: stage 1 rows are ~95% image + prompt); 0 = on every token.
    c.lm_head_target_fraction = 0.5

    c.model = ml_collections.ConfigDict()
    c.model.base_dir = ""  # model dir from `python -m llava_jax.convert` (or a stage workdir)
    c.model.preset = ""  # random init from this LlavaConfig preset when base_dir is ''
    c.model.overrides = ml_collections.ConfigDict()  # LlavaConfig fields for random init
    c.model.vocab_from_tokenizer = False  # random init: vocab/image/pad/bos/eos ids from tokenizer
    c.model.projector = ""  # stage-1 workdir, model dir or mm_projector.{bin,safetensors}
    c.model.reinit_projector = stage == 1  # random projector (stage 1 trains it from scratch)
    c.model.tokenizer_dir = ""  # default: <base_dir>/tokenizer
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights (and optimizer state)
    c.model.remat_policy = "full"  # models.config.REMAT_POLICIES
    c.model.scan_layers = True  # lax.scan over layers (one compiled layer)
    # Decoder attention kernel: 'auto' (splash on TPU, cudnn on NVIDIA GPUs, xla / chunked on
    # CPU) | 'xla' | 'chunked' | 'cudnn' | 'splash' (models.config.ATTENTION_IMPLEMENTATIONS)
    c.model.attention = "auto"

    # LoRA / QLoRA (models/lora.py): only the adapters and the projector train; the rest of
    # the model is frozen, stored in model.dtype (or quantized).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # adapter rank; 0 = off (full training of the stage's trainable params)
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.lora.dropout = 0.05  # dropout on the adapters' input while training
    c.lora.targets = lora.DEFAULT_TARGETS  # regex on module paths (default: the LLM's q/k/v/o/gate/up/down)
    c.lora.projector_learning_rate = 0.0  # peak lr of the (fully trained) projector; 0 = optim.learning_rate
    c.lora.base_quantization = "none"  # frozen adapted kernels: 'none' | 'int8' | 'nf4' (QLoRA)

    c.data = default_data_config(stage)
    c.data.packing = False  # one sample per row: a step holds exactly global_batch_size samples
    c.data.buckets = (768, 1024, 1536, 2048)  # image samples are >= 577 tokens long

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5 if stage == 2 else 1e-3  # peak lr
    c.optim.schedule = "cosine"  # 'cosine' | 'constant' (both after linear warm-up)
    c.optim.warmup_ratio = 0.03  # fraction of the steps spent warming up
    c.optim.weight_decay = 0.0  # AdamW decay (never on biases / norm scales)
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
    c.optim.global_batch_size = 128 if stage == 2 else 256  # rows per optimizer step, all hosts
    c.optim.grad_accum_steps = 1  # micro-batches per step (each global_batch_size / this rows)
    c.optim.total_steps = -1  # schedule length; -1 = ceil(samples x epochs / global batch)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data-parallel replicas
    c.mesh.fsdp = -1  # parameter-sharded data parallelism (-1 = all remaining devices)
    c.mesh.tensor = 1  # tensor parallelism over heads / MLP / vocab
    c.mesh.param_rules = sharding.DEFAULT_PARAM_RULES  # (path regex, logical axes)
    c.mesh.logical_axis_rules = sharding.DEFAULT_LOGICAL_AXIS_RULES  # (logical, mesh axis)
    # Activation sharding constraints (logical, mesh axes) while the step is traced; () = none
    c.mesh.activation_rules = sharding.DEFAULT_ACTIVATION_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # save every N steps (and always at the end / on SIGTERM)
    c.checkpoint.max_to_keep = 2  # finished checkpoints kept
    c.checkpoint.async_save = True  # write in the background while training goes on
    # Newest checkpoint does not restore on resume: 'fallback' (warn, use the newest older step
    # that does, move the bad one aside to <step>.corrupt-<time>) | 'fail' (stop, name it).
    c.checkpoint.on_corrupt = "fallback"

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # console + TensorBoard interval
    c.log.tensorboard = True  # event files in WORKDIR/tensorboard
    c.log.progress_bar = True  # tqdm bar when stderr is a terminal
    c.log.peak_flops_per_device = 0.0  # for MFU; 0 = table by device kind (none for CPU)

    c.eval = ml_collections.ConfigDict()
    c.eval.file = ""  # held-out model_vqa-style JSONL evaluated after training ('' = none)
    c.eval.image_root = ""  # folder of its images
    c.eval.batch_size = 32  # generation batch
    c.eval.max_new_tokens = 8  # answer length limit
    return c


def config_error(field: str, value, message: str):
    raise ValueError(f"config.{field}={value!r}: {message}")


def validate_config(c) -> None:
    """Fails at start-up, naming the field, on settings that cannot work."""
    if c.stage not in (1, 2):
        config_error("stage", c.stage, "use 1 (pretraining) or 2 (instruction tuning)")
    if bool(c.model.base_dir) == bool(c.model.preset):
        config_error("model.base_dir", c.model.base_dir, "set exactly one of model.base_dir (a converted "
              "model directory) and model.preset (random init, for tests and the demo)")
    if c.model.base_dir and not os.path.isdir(c.model.base_dir):
        config_error("model.base_dir", c.model.base_dir, "not a directory; convert weights with "
              "`python -m llava_jax.convert` first")
    if c.model.projector and not os.path.exists(c.model.projector):
        config_error("model.projector", c.model.projector, "does not exist")
    if c.model.preset and not c.model.tokenizer_dir:
        config_error("model.tokenizer_dir", "", "random init needs a tokenizer directory")
    for field, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                           ("remat_policy", REMAT_POLICIES)):
        if c.model[field] not in allowed:
            config_error(f"model.{field}", c.model[field], f"use one of {allowed}")
    o = c.optim
    if not o.learning_rate > 0:
        config_error("optim.learning_rate", o.learning_rate, "must be > 0")
    if not 0 <= o.warmup_ratio < 1:
        config_error("optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    if o.schedule not in ("cosine", "constant"):
        config_error("optim.schedule", o.schedule, "use 'cosine' or 'constant'")
    if o.weight_decay < 0 or o.grad_clip_norm < 0:
        config_error("optim.weight_decay", o.weight_decay, "decay and grad_clip_norm must be >= 0")
    if o.grad_accum_steps < 1:
        config_error("optim.grad_accum_steps", o.grad_accum_steps, "must be >= 1")
    if o.global_batch_size < 1 or o.global_batch_size % o.grad_accum_steps:
        config_error("optim.global_batch_size", o.global_batch_size,
              f"must be a positive multiple of optim.grad_accum_steps={o.grad_accum_steps}")
    if o.total_steps == 0 or o.total_steps < -1:
        config_error("optim.total_steps", o.total_steps, "use a positive step count or -1 (derive)")
    if c.checkpoint.every_steps < 1 or c.checkpoint.max_to_keep < 1:
        config_error("checkpoint.every_steps", c.checkpoint.every_steps,
              "every_steps and max_to_keep must be >= 1")
    if c.checkpoint.on_corrupt not in ("fallback", "fail"):
        config_error("checkpoint.on_corrupt", c.checkpoint.on_corrupt, "use 'fallback' (resume "
                     "from the newest checkpoint that restores) or 'fail'")
    if c.log.every_steps < 1:
        config_error("log.every_steps", c.log.every_steps, "must be >= 1")
    if c.loss_chunk_size < 0:
        config_error("loss_chunk_size", c.loss_chunk_size, "must be >= 0")
    if not 0 <= c.lm_head_target_fraction <= 1:
        config_error("lm_head_target_fraction", c.lm_head_target_fraction, "must be in [0, 1]")
    lora_settings(c)
    try:
        validate_data_config(c.data)
    except ValueError as e:
        raise ValueError(f"config.{e}") from e
    optim.stage_trainable_pattern(c.stage, c.trainable)


def lora_settings(c) -> lora.LoraConfig | None:
    """The run's LoRA settings (None when lora.rank is 0); fails naming the bad field."""
    settings = c.get("lora")
    if settings is None or settings.rank == 0:
        if settings is not None and settings.base_quantization != "none":
            config_error("lora.base_quantization", settings.base_quantization,
                         "quantizes the frozen base of a LoRA run: set lora.rank > 0 too")
        return None
    if settings.rank < 0:
        config_error("lora.rank", settings.rank, "use a positive rank, or 0 for no LoRA")
    if settings.projector_learning_rate < 0:
        config_error("lora.projector_learning_rate", settings.projector_learning_rate,
                     "must be >= 0 (0 = optim.learning_rate)")
    try:
        return lora.LoraConfig(rank=int(settings.rank), alpha=float(settings.alpha),
                               dropout=float(settings.dropout), targets=settings.targets,
                               base_quantization=settings.base_quantization)
    except ValueError as e:
        raise ValueError(f"config.{e}") from e


def check_mesh_fits(c, mesh) -> None:
    """The batch must split evenly over the data-parallel devices and the processes."""
    rows = c.optim.global_batch_size // c.optim.grad_accum_steps
    split = sharding.batch_rows_divisor(mesh)
    if rows % split:
        config_error("optim.global_batch_size", c.optim.global_batch_size,
              f"micro-batch of {rows} rows (global_batch_size / grad_accum_steps="
              f"{c.optim.grad_accum_steps}) does not split over mesh.data x mesh.fsdp = "
              f"{split} devices")
    if rows % jax.process_count():
        config_error("optim.global_batch_size", c.optim.global_batch_size,
              f"micro-batch of {rows} rows does not split over {jax.process_count()} processes")
