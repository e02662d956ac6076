"""LLaVA-1.5 stage 2 (visual instruction tuning): projector + LLM on llava_v1_5_mix665k.

    python -m llava_jax.train --config=configs/finetune.py:7b --workdir=runs/finetune-7b \
        --config.model.projector=runs/pretrain-7b

Recipe (scripts/v1_5/finetune.sh): projector + LLM (CLIP frozen), lr 2e-5, global batch 128,
1 epoch, cosine, warm-up 3 %, no weight decay, 2048 tokens, bf16, gradient checkpointing,
'pad' images, vicuna_v1 template, batches grouped by modality. model.projector is a stage-1
workdir, a model dir, or an original mm_projector.bin / .safetensors.
"""

from llava_jax.training import targets
from llava_jax.training.config import default_config

SIZES = ("7b", "13b")


def get_config(arg: str | None = None):
    """arg: SIZE (7b, 13b) or SIZE,TARGET: also the recommended micro-batch rows and
    accumulation for TARGET (v5p-8, v6e-8, v5litepod-8, 8x80g, 8x40g; training/targets.py)."""
    size, target = targets.parse_arg(arg, SIZES, "configs/finetune.py")
    config = default_config(stage=2)
    config.model.base_dir = f"models/vicuna-{size}-v1.5-clip336"  # converted LLM + vision tower
    config.model.projector = f"runs/pretrain-{size}"  # stage-1 output
    config.data.json_paths = ("data/llava_v1_5_mix665k.json",)
    config.data.image_roots = ("data",)  # coco/, gqa/, ocr_vqa/, textvqa/, vg/ below it
    config.data.template = "vicuna_v1"
    config.data.aspect = "pad"
    config.data.group_by_modality = True
    config.data.worker_count = 8
    config.optim.learning_rate = 2e-5
    config.optim.global_batch_size = 128
    config.checkpoint.every_steps = 500
    if target:
        targets.apply_target(config, size, config.stage, target)
    return config
