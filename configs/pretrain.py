"""LLaVA-1.5 stage 1 (feature alignment): train the projector on LCS-558K captions.

    python -m llava_jax.train --config=configs/pretrain.py:7b --workdir=runs/pretrain-7b

Recipe (scripts/v1_5/pretrain.sh): projector only, lr 1e-3, global batch 256, 1 epoch, cosine,
warm-up 3 %, no weight decay, 2048 tokens, bf16, gradient checkpointing, 'square' images,
'plain' template. The base model dir holds Vicuna v1.5 + CLIP ViT-L/14-336 converted with
`python -m llava_jax.convert` (a missing or, with model.reinit_projector, existing projector
is initialised at random). Its output WORKDIR (or WORKDIR/projector/mm_projector.safetensors)
is finetune.py's model.projector.
"""

from llava_jax.training import targets
from llava_jax.training.config import default_config

SIZES = ("7b", "13b")


def get_config(arg: str | None = None):
    """arg: SIZE (7b, 13b) or SIZE,TARGET: also the recommended micro-batch rows and
    accumulation for TARGET (v5p-8, v6e-8, v5litepod-8, 8x80g, 8x40g; training/targets.py)."""
    size, target = targets.parse_arg(arg, SIZES, "configs/pretrain.py")
    config = default_config(stage=1)
    config.model.base_dir = f"models/vicuna-{size}-v1.5-clip336"  # converted LLM + vision tower
    config.data.json_paths = ("data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",)
    config.data.image_roots = ("data/LLaVA-Pretrain/images",)
    config.data.template = "plain"
    config.data.aspect = "square"
    config.data.group_by_modality = False  # all samples have an image
    config.data.buckets = (640, 768, 1024)  # 576 image tokens + a short caption
    config.data.max_length = 1024
    config.data.worker_count = 8  # image decoding in grain worker processes
    config.optim.learning_rate = 1e-3
    config.optim.global_batch_size = 256
    config.checkpoint.every_steps = 500
    if target:
        targets.apply_target(config, size, config.stage, target)
    return config
