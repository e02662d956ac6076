"""LLaVA-1.5 stage 2 with LoRA (scripts/v1_5/finetune_lora.sh), and QLoRA.

    python -m llava_jax.train --config=configs/finetune_lora.py:7b --workdir=runs/lora-7b \
        --config.model.projector=runs/pretrain-7b
    --config=configs/finetune_lora.py:13b          the same on 13B
    --config=configs/finetune_lora.py:qlora        7B with an nf4 base (QLoRA; 13b,qlora too)
    --config=configs/finetune_lora.py:7b,int8      an int8 base

Recipe: LoRA rank 128, alpha 256, dropout 0.05 on the LLM's q/k/v/o/gate/up/down projections;
the projector trains fully at 2e-5 (mm_projector_lr), the adapters at 2e-4; global batch
128, 1 epoch, cosine, warm-up 3 %, no weight decay, 2048 tokens, bf16, gradient checkpointing;
CLIP and the rest of the LLM frozen (held in bf16, or int8 / nf4). The data and template are
configs/finetune.py's. Export: `python -m llava_jax.convert jax-to-hf --input WORKDIR --output
HF_DIR` (merged) or `... --adapter-only` (a PEFT adapter directory).
"""

import importlib.util
import os

# configs/ is not a package: load the stage-2 preset beside this file by path.
_spec = importlib.util.spec_from_file_location(
    "llava_jax_configs_finetune", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "finetune.py"))
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)

SIZES = ("7b", "13b")
QUANTIZATION = {"qlora": "nf4", "nf4": "nf4", "int8": "int8"}


def get_config(arg: str | None = None):
    """arg: SIZE, qlora, or SIZE,{qlora|nf4|int8} (SIZE in 7b, 13b; default 7b)."""
    parts = [p for p in (arg or "").split(",") if p]
    sizes = [p for p in parts if p in SIZES]
    quantized = [p for p in parts if p in QUANTIZATION]
    if len(sizes) > 1 or len(quantized) > 1 or len(sizes) + len(quantized) != len(parts):
        raise ValueError(f"configs/finetune_lora.py:{arg}: use SIZE, qlora or SIZE,qlora with "
                         f"SIZE in {SIZES} (or int8 / nf4 for the base's storage)")
    config = finetune.get_config(sizes[0] if sizes else "7b")
    config.lora.rank = 128
    config.lora.alpha = 256.0
    config.lora.dropout = 0.05
    config.lora.projector_learning_rate = 2e-5
    config.lora.base_quantization = QUANTIZATION[quantized[0]] if quantized else "none"
    config.optim.learning_rate = 2e-4
    config.optim.global_batch_size = 128
    config.optim.schedule = "cosine"
    config.optim.warmup_ratio = 0.03
    config.optim.weight_decay = 0.0
    config.data.num_epochs = 1
    return config
