"""`python -m llava_jax.datagen --annotations=... --kind={conversation,detail,complex}
--endpoint=URL --model=NAME --output=FILE.jsonl [--to-llava=OUT.json]`.

Asks a text-only LLM (any OpenAI-compatible chat-completions endpoint) for one sample per
image, writing each usable reply to FILE.jsonl as it arrives (rerun the same command to
resume: images already in FILE are skipped), and with --to-llava converts FILE (plus any
--merge files) into LLaVA training JSON. Without --annotations it only converts.

Exit status: 0 done; 1 done, but some requests failed (run again to ask those again); 2 bad
arguments or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from llava_jax.datagen.annotations import read_annotations
from llava_jax.datagen.generate import generate
from llava_jax.datagen.llava import write_llava_json
from llava_jax.datagen.prompts import KINDS, load_prompts
from llava_jax.evaluation.openai_client import add_client_flags, client_from_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.datagen", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--annotations", help="CAPTIONS.json,INSTANCES.json (COCO format) or "
                        "one JSONL of {image, captions, boxes}")
    parser.add_argument("--kind", choices=KINDS, help="the kind of sample to generate")
    parser.add_argument("--output", required=True, help="generated samples, JSONL (appended; "
                        "unusable replies go to <stem>.rejected.jsonl)")
    parser.add_argument("--to-llava", metavar="OUT.json",
                        help="then write LLaVA training JSON from --output (and --merge)")
    parser.add_argument("--merge", default="", metavar="A.jsonl,B.jsonl",
                        help="more generated files to put into the --to-llava JSON")
    parser.add_argument("--image-prefix", default="",
                        help="prepended to image names in the LLaVA JSON (e.g. coco/train2017/)")
    parser.add_argument("--prompts", metavar="DIR",
                        help="prompt folder with <kind>/system.txt, NNN_context.txt, "
                        "NNN_reply.txt (unset: the package's)")
    parser.add_argument("--few-shot", type=int,
                        help="use only the first N examples (unset: all; 0: none)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the detail instruction and the <image> placement")
    parser.add_argument("--sampling-seed", type=int,
                        help="send a per-image `seed` derived from this with every request "
                        "(reproducible sampling where the endpoint honours it)")
    parser.add_argument("--retry-unparsable", action="store_true",
                        help="ask again for images whose reply was rejected earlier")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    add_client_flags(parser, what="LLM")
    args = parser.parse_args(argv)
    if args.annotations:
        missing = [f"--{name}" for name in ("kind", "endpoint", "model")
                   if not getattr(args, name)]
        if missing:
            parser.error(f"generating needs {', '.join(missing)}")
    elif not args.to_llava:
        parser.error("give --annotations (generate) and/or --to-llava (convert)")
    if args.few_shot is not None and args.few_shot < 0:
        parser.error("--few-shot must be >= 0")
    return args


def format_summary(kind: str, summary: dict) -> str:
    """The line printed after a run: what was asked, what came back."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items()))
    stopped = summary["stopped_by"]
    return (f"datagen {kind}: {summary['images']} images, {summary['already_done']} already "
            f"done; ok {summary['ok']}, retried {summary['retried']}, failed "
            f"{summary['failed']}, unparsable {summary['unparsable']}"
            + (f" ({reasons})" if reasons else "")
            + f", not sent {summary['not_sent']}"
            + (f" (stopped by --{stopped.replace('_', '-')})" if stopped else "")
            + f", {summary['tokens']} tokens")


def run(args: argparse.Namespace) -> dict:
    """Generates (when --annotations is given), then converts; returns the summary."""
    summary: dict = {}
    if args.annotations:
        prompts = load_prompts(args.kind, args.prompts)
        annotations = read_annotations(args.annotations)[:args.limit]
        with client_from_args(args) as client:
            summary = generate(annotations, kind=args.kind, prompts=prompts, client=client,
                               output=args.output, seed=args.seed, few_shot=args.few_shot,
                               sampling_seed=args.sampling_seed,
                               retry_unparsable=args.retry_unparsable, progress=args.progress)
        print(format_summary(args.kind, summary), flush=True)
        print(f"samples: {summary['output']}\nrejected replies: {summary['rejected']}")
    if args.to_llava:
        paths = [args.output] + [p for p in args.merge.split(",") if p.strip()]
        stats = write_llava_json(paths, args.to_llava, seed=args.seed,
                                 image_prefix=args.image_prefix)
        summary["llava"] = stats
        print(f"LLaVA JSON: {args.to_llava}: {stats['samples']} samples ({stats['duplicates']} "
              f"duplicates, {stats['repeated_questions']} repeated questions, "
              f"{stats['malformed']} malformed records left out)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if summary.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
