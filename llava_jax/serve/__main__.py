"""`python -m llava_jax.serve --checkpoint=DIR [--host=127.0.0.1] [--port=8000] [--max-batch=16]
[--max-tokens=512] [--template=NAME] [--allow-local-images DIR]`: the OpenAI-compatible server.

The model loads, every decode program compiles (a warm-up request per sampling mode), then
uvicorn serves on HOST:PORT; the web chat page is at http://HOST:PORT/. The engine takes flat
(LLaVA-1.5) checkpoints only: a tiled one (LLaVA-NeXT / OneVision) is refused at start-up
(`python -m llava_jax.chat` and `llava_jax.eval` run those).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from llava_jax.checkpoint import (
    DEFAULT_TEMPLATE,
    checkpoint_template,
    load_pretrained,
    read_config,
)
from llava_jax.data import IMAGE_TOKEN, TEMPLATES, tokenize_generation_prompt
from llava_jax.inference.engine import Engine, EngineRequest
from llava_jax.serve.protocol import ServerLimits, stop_strings

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.serve",
        description="OpenAI-compatible chat server (continuous batching) and web chat page.")
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="requests decoded together (KV cache slots)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="default and upper bound of a request's max_tokens")
    parser.add_argument("--template", default=None,
                        help=f"conversation template (default: the one the checkpoint trained with, "
                             f"else its decoder family's, else {DEFAULT_TEMPLATE}); one of {', '.join(sorted(TEMPLATES))}")
    parser.add_argument("--allow-local-images", metavar="DIR", default=None,
                        help="accept image paths (file:// or plain) inside DIR")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot; beyond it: 503")
    parser.add_argument("--max-images", type=int, default=4, help="images per request")
    parser.add_argument("--context", type=int, default=None,
                        help="prompt + answer tokens per request (default: the model's "
                             "max_position_embeddings). Each slot holds context + 128 "
                             "cache columns and every decode step attends over all of them: "
                             "set it no larger than needed")
    parser.add_argument("--prefill-batch", type=int, default=8,
                        help="prompts prefilled together at most")
    parser.add_argument("--temperature", type=float, default=0.2,
                        help="temperature of requests that set none (LLaVA's demo default)")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send (default: the checkpoint folder's name)")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--warmup", choices=("all", "none"), default="all",
                        help="compile the decode programs before serving (none: on first use)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_tokens", "max_images", "prefill_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        parser.error("--max-queue must be >= 0")
    if not 0 <= args.temperature <= 2:
        parser.error("--temperature must be in [0, 2]")
    if args.template is not None and args.template not in TEMPLATES:
        parser.error(f"unknown --template {args.template!r}; one of {sorted(TEMPLATES)}")
    if args.allow_local_images is not None and not os.path.isdir(args.allow_local_images):
        parser.error(f"--allow-local-images {args.allow_local_images}: not a directory")
    if not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: not a directory")
    return args


def warm_up(engine: Engine, tokenizer, template: str) -> float:
    """Compiles the decode programs (greedy, sampled, nucleus) and one image prefill."""
    config = engine.model.config
    size = config.vision.image_size
    start = time.perf_counter()
    for temperature, top_p, image in ((0.0, 1.0, True), (1.0, 1.0, False), (1.0, 0.5, False)):
        question = f"{IMAGE_TOKEN}\nHello." if image else "Hello."
        ids = tokenize_generation_prompt(question, tokenizer, template, config.num_image_tokens,
                                         config.image_token_index)
        pixels = np.zeros((1, size, size, 3), np.float32) if image else None
        budget = min(2, engine.context - len(ids))
        if budget >= 1:
            engine.submit(EngineRequest(ids, pixels, max_new_tokens=budget,
                                        temperature=temperature, top_p=top_p))
            engine.run_until_idle()
    engine.stats.clear()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn  # the serve extra

    from llava_jax.serve.app import create_app

    # Before loading the weights (minutes for a big model): the engine is flat-only.
    try:
        tiled = read_config(args.checkpoint).anyres
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if tiled:
        print(f"error: {args.checkpoint} is a tiled (anyres) model; the server takes flat "
              "(LLaVA-1.5) models only: use python -m llava_jax.chat or llava_jax.eval.",
              file=sys.stderr)
        return 2
    pretrained = load_pretrained(args.checkpoint, dtype=args.dtype)
    if pretrained.tokenizer is None:
        print(f"error: {args.checkpoint} has no tokenizer/ folder; the server needs one.",
              file=sys.stderr)
        return 2
    config = pretrained.config
    try:
        template = args.template or checkpoint_template(args.checkpoint)
    except ValueError as error:
        print(f"error: {error} Pass --template.", file=sys.stderr)
        return 2
    limit = config.text.max_position_embeddings
    context = min(args.context or limit, limit)
    engine = Engine(pretrained.model, pretrained.tokenizer, max_batch=args.max_batch,
                    context=context, max_queue=args.max_queue, prefill_batch=args.prefill_batch,
                    stop_strings=stop_strings(template))
    model_id = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    limits = ServerLimits(model_id=model_id, template=template,
                          max_tokens=min(args.max_tokens, context - 1), context=context,
                          max_images=args.max_images, default_temperature=args.temperature,
                          allow_local_images=args.allow_local_images)
    seconds = warm_up(engine, pretrained.tokenizer, template) if args.warmup == "all" else 0.0
    app = create_app(engine, limits, pretrained.tokenizer)
    print(f"llava_jax.serve: {model_id} (template {template}, context {context}, "
          f"{engine.max_batch} slots x {engine.width} cache columns, compiled in {seconds:.1f} s) "
          f"on http://{args.host}:{args.port}/ (OpenAI API at http://{args.host}:{args.port}/v1)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
