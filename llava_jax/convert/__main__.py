"""`python -m llava_jax.convert`: PyTorch LLaVA checkpoints <-> llava_jax model directories.

  hf-to-jax     --input HF_DIR --output MODEL_DIR         (llava-hf Llava / LlavaNext / LlavaOnevision)
  llava-to-jax  --input LLAVA_DIR --vision-tower CLIP_DIR --output MODEL_DIR
                [--projector mm_projector.bin]            (original LLaVA layout)
  jax-to-hf     --input MODEL_DIR --output HF_DIR         (for transformers / vLLM / ...)
                [--adapter-only]                          (LoRA: a PEFT adapter directory)
  peft-to-jax   --input ADAPTER_DIR --base MODEL_DIR --output MODEL_DIR
                                                          (PEFT / original LoRA adapter)
A LoRA workdir's jax-to-hf output has the adapters merged into the weights.
"""

from __future__ import annotations

import argparse
import logging
import sys

from llava_jax.convert import adapters, core
from llava_jax.convert.hf_config import ConfigError
from llava_jax.convert.tensors import CheckpointError

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--output", required=True, help="directory to create")
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="dtype of the written weights (default: the input's)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("hf-to-jax", help="transformers Llava / LlavaNext / LlavaOnevision "
                                      "ForConditionalGeneration -> llava_jax")
    p.add_argument("--input", required=True, help="HF directory (config.json + safetensors)")
    common(p)

    p = sub.add_parser("llava-to-jax", help="original LLaVA (+ CLIP) -> llava_jax")
    p.add_argument("--input", required=True,
                   help="LlavaLlamaForCausalLM / LlavaMistralForCausalLM directory (LLaVA-1.5, "
                        "or LLaVA-1.6 anyres), or a plain LLaMA/Vicuna with --projector")
    p.add_argument("--vision-tower", required=True, help="CLIPVisionModel or CLIPModel directory")
    p.add_argument("--projector", default=None, help="stage-1 mm_projector.bin (or .safetensors)")
    p.add_argument("--init-projector", default=None, metavar="TYPE",
                   help="plain LLaMA input: add a freshly initialised projector of this type "
                        "(e.g. mlp2x_gelu): the stage-1 starting point")
    p.add_argument("--vision-feature-layer", type=int, default=None,
                   help="override mm_vision_select_layer (default: config, else -2)")
    p.add_argument("--image-aspect", choices=("pad", "square"), default=None,
                   help="override image_aspect_ratio (default: config, else pad)")
    common(p)

    p = sub.add_parser("jax-to-hf", help="llava_jax -> transformers Llava / LlavaNext / "
                                      "LlavaOnevision ForConditionalGeneration")
    p.add_argument("--input", required=True, help="model directory or training workdir")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size")
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA workdir: write a PEFT adapter directory (adapter_config.json + "
                        "adapter_model.safetensors, projector as modules_to_save) instead of "
                        "the merged model")
    p.add_argument("--base-model", default=None, help="--adapter-only: base_model_name_or_path "
                   "to record in adapter_config.json")
    common(p)

    p = sub.add_parser("peft-to-jax", help="PEFT LoRA adapter (or the original's LoRA release) "
                       "+ converted base -> llava_jax LoRA model directory")
    p.add_argument("--input", required=True, help="adapter directory (adapter_config.json + "
                   "adapter_model.{safetensors,bin} [+ non_lora_trainables.bin])")
    p.add_argument("--base", required=True, help="llava_jax model directory of the base model")
    p.add_argument("--base-quantization", choices=("none", "int8", "nf4"), default="none",
                   help="store the adapted base kernels quantized (to continue as QLoRA)")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    progress = not getattr(args, "no_progress", False)
    try:
        if args.command == "hf-to-jax":
            out = core.hf_to_jax(args.input, args.output, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=progress)
        elif args.command == "llava-to-jax":
            out = core.llava_to_jax(args.input, args.vision_tower, args.output,
                                    projector=args.projector,
                                    init_projector=args.init_projector, dtype=args.dtype,
                                    vision_feature_layer=args.vision_feature_layer,
                                    image_aspect=args.image_aspect, overwrite=args.overwrite,
                                    progress=progress)
        elif args.command == "peft-to-jax":
            out = adapters.import_peft_adapter(args.input, args.base, args.output,
                                               base_quantization=args.base_quantization,
                                               overwrite=args.overwrite)
        elif args.adapter_only:
            out = adapters.write_peft_adapter(args.input, args.output, dtype=args.dtype,
                                              overwrite=args.overwrite,
                                              base_model_name_or_path=args.base_model)
        else:
            out = core.jax_to_hf(args.input, args.output, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=progress,
                                 max_shard_bytes=int(args.max_shard_size_gb * (1 << 30)))
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
