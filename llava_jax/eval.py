"""Benchmark evaluation: `python -m llava_jax.eval --task=TASK --checkpoint=DIR ...`.

Tasks (greedy decoding, conversation template `vicuna_v1` by default, as LLaVA-1.5's
`scripts/v1_5/eval/*.sh`):

  demo       the built-in held-out split (llava_jax.data.demo eval.jsonl), exact match
  vqa        model_vqa question JSONL {question_id, image, text} -> answers JSONL
             {question_id, prompt, text, answer_id, model_id, metadata}; the short-answer
             instruction is appended unless the question already ends with it; with
             --ground-truth (TextVQA / VQAv2 annotations) the VQA soft accuracy is reported
  pope       POPE question JSONL {question_id, image, text, category} + --pope-annotations
             DIR with coco_pope_{category}.json: accuracy, precision, recall, F1, yes-ratio
  scienceqa  llava_test_CQM-A.json + --problems problems.json + --pid-splits pid_splits.json:
             overall, image and per-group accuracy (the paper's table) in a results JSON

Answers are appended to --output (JSONL) and flushed after every batch; ids already there are
skipped, so an interrupted run resumes where it stopped. With several JAX processes, process i
answers questions i, i+n, i+2n, ... into `<output stem>.<i>-of-<n>.jsonl`; after a barrier,
process 0 merges the shard files into --output (question-file order) and scores.

This module only turns the flags into calls of llava_jax.evaluation (tasks: questions,
answering, scoring; answers: the answers files), where `evaluate_demo(model, tokenizer)`, the
library entry point the training demo calls, also lives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils

from llava_jax.checkpoint import load_pretrained
from llava_jax.data import ImageDecodeError
from llava_jax.evaluation.answers import (
    done_ids,
    merge_shards,
    read_answers,
    shard_path,
    write_answers,
)
from llava_jax.evaluation.tasks import (
    DEFAULT_MAX_NEW_TOKENS,
    TASKS,
    Question,
    format_result,
    load_questions,
    score_task,
)
from llava_jax.sharding import maybe_initialize_distributed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags; --data is required for every task but demo."""
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--data", help="question file (default for demo: the built-in split)")
    parser.add_argument("--image-folder", help="image root for the question file's paths")
    parser.add_argument("--output", required=True, help="answers JSONL (appended, resumable)")
    parser.add_argument("--results", help="metrics JSON (default: <output stem>_results.json)")
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"default per task: {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--dtype", help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--model-id", help="model_id in answer records (default: checkpoint name)")
    parser.add_argument("--no-short-answer-prompt", dest="short_answer", action="store_false",
                        help="vqa/pope: do not append the short-answer instruction")
    parser.add_argument("--ground-truth", help="vqa: TextVQA/VQAv2 annotation JSON")
    parser.add_argument("--pope-annotations", help="pope: folder with coco_pope_{category}.json")
    parser.add_argument("--problems", help="scienceqa: problems.json")
    parser.add_argument("--pid-splits", help="scienceqa: pid_splits.json")
    parser.add_argument("--split", default="test", help="scienceqa: split of pid_splits.json")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--distributed", choices=("auto", "yes", "no"), default="auto",
                        help="jax.distributed.initialize(): auto = when launched as several "
                        "processes (launch/local.py, SLURM, a TPU pod slice)")
    args = parser.parse_args(argv)
    if args.task != "demo" and not args.data:
        parser.error(f"--data (the question file) is required for --task={args.task}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Answers (this process's share of) the questions and, on process 0, scores them."""
    for path, what in ((args.data, "question file"), (args.image_folder, "image folder")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist.")
    questions, data, image_root = load_questions(
        args.task, args.data, image_folder=args.image_folder, short_answer=args.short_answer,
        limit=args.limit)
    pretrained = load_pretrained(args.checkpoint, dtype=args.dtype)
    if pretrained.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer/ folder; it is needed to build "
                         "prompts (save the model with its tokenizer).")
    model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
    index, count = jax.process_index(), jax.process_count()
    own_path = shard_path(args.output, index, count)
    make_record = None
    if args.task == "demo":
        def make_record(q: Question, text: str) -> dict:
            return {"question_id": q.question_id, "prompt": q.prompt, "text": text,
                    "answer": q.reference, "category": q.category, "model_id": model_id}
    # A missing or undecodable image stops the run with its path (the full path shows which
    # --image-folder was used); the answers of earlier batches are already in the file.
    write_answers(
        pretrained.model, pretrained.tokenizer, questions[index::count], own_path,
        model_id=model_id, template=args.template, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task],
        image_root=image_root, progress=args.progress, make_record=make_record,
        skip=done_ids(args.output) if count > 1 else frozenset())
    if count > 1:
        multihost_utils.sync_global_devices("llava_jax.eval answers written")
        if index != 0:
            return None
        merge_shards(args.output, count, questions)
    answers = read_answers(args.output, questions)
    result = score_task(args.task, answers, questions, data=data, ground_truth=args.ground_truth,
                        pope_annotations=args.pope_annotations, problems=args.problems,
                        pid_splits=args.pid_splits, split=args.split)
    result.update(task=args.task, checkpoint=os.path.abspath(args.checkpoint),
                  data=os.path.abspath(data), answers_file=os.path.abspath(args.output))
    results_path = args.results or os.path.splitext(args.output)[0] + "_results.json"
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(format_result(args.task, result))
    print(f"answers: {args.output}\nresults: {results_path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    maybe_initialize_distributed(args.distributed)  # before any other JAX call
    try:
        run(args)
    except (FileNotFoundError, ImageDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
