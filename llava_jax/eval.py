"""Benchmark evaluation: `python -m llava_jax.eval --task=TASK --checkpoint=DIR ...`.

Tasks (greedy decoding; the conversation template is the one the checkpoint trained with, else
its decoder family's: `vicuna_v1` for LLaVA-1.5, as its `scripts/v1_5/eval/*.sh`):

  demo       the built-in held-out split (llava_jax.data.demo eval.jsonl), exact match
  vqa        model_vqa question JSONL {question_id, image, text} -> answers JSONL
             {question_id, prompt, text, answer_id, model_id, metadata}; the short-answer
             instruction is appended unless the question already ends with it; with
             --ground-truth (TextVQA / VQAv2 annotations) the VQA soft accuracy is reported
  pope       POPE question JSONL {question_id, image, text, category} + --pope-annotations
             DIR with coco_pope_{category}.json: accuracy, precision, recall, F1, yes-ratio
  scienceqa  llava_test_CQM-A.json + --problems problems.json + --pid-splits pid_splits.json:
             overall, image and per-group accuracy (the paper's table) in a results JSON
  llava_bench  LLaVA-Bench questions JSONL {question_id, image, text, category} + --context
             (captions per image) + --reference answers (or --reference-endpoint to write
             them): an LLM judge at --judge-endpoint (any OpenAI-compatible server) rates the
             reference and the model's answer 1-10; relative score = mean(model) /
             mean(reference) x 100 per category and overall (evaluation/llava_bench.py)

Exit status: 0; 2 for bad arguments or inputs; 1 when llava_bench judge or reference requests
failed (the results cover the judged questions; run again to judge the rest).

Answers are appended to --output (JSONL) and flushed after every batch; ids already there are
skipped, so an interrupted run resumes where it stopped (llava_bench's judgements and
generated reference answers too, one line per reply). With several JAX processes, process i
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

from llava_jax.checkpoint import checkpoint_template, load_pretrained
from llava_jax.data import ImageDecodeError
from llava_jax.evaluation import llava_bench
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
from llava_jax.evaluation.openai_client import add_client_flags, client_from_args
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
    parser.add_argument("--template", default=None,
                        help="default: the checkpoint's train_config.json data.template, else "
                             "its decoder family's (vicuna_v1, llava_llama_3, mistral_instruct, "
                             "qwen_1_5)")
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
    parser.add_argument("--context", help="llava_bench: JSONL {image, caption} (the image's "
                        "description the judge reads)")
    parser.add_argument("--reference", help="llava_bench: reference answers JSONL {question_id, "
                        "text} (written there by --reference-endpoint when given; default "
                        "<output stem>_reference.jsonl)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    add_client_flags(parser, "judge-", what="llava_bench judge",
                     temperature=llava_bench.JUDGE_TEMPERATURE)
    add_client_flags(parser, "reference-", what="llava_bench reference-answer LLM "
                     "(model default: --judge-model)")
    parser.add_argument("--distributed", choices=("auto", "yes", "no"), default="auto",
                        help="jax.distributed.initialize(): auto = when launched as several "
                        "processes (launch/local.py, SLURM, a TPU pod slice)")
    args = parser.parse_args(argv)
    if args.task != "demo" and not args.data:
        parser.error(f"--data (the question file) is required for --task={args.task}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.task == "llava_bench":
        missing = [flag for flag, value in (("--context", args.context),
                                            ("--judge-endpoint", args.judge_endpoint),
                                            ("--judge-model", args.judge_model)) if not value]
        if not args.reference and not args.reference_endpoint:
            missing.append("--reference or --reference-endpoint")
        if missing:
            parser.error(f"--task=llava_bench needs {', '.join(missing)}")
    return args


def llava_bench_references(args: argparse.Namespace, questions: list[Question]) -> str:
    """The reference answers file, after writing the missing ones with --reference-endpoint
    (process 0 only; the others never read it)."""
    contexts = llava_bench.read_contexts(args.context)
    llava_bench.check_contexts(questions, contexts, args.context)
    path = args.reference or llava_bench.default_reference_path(args.output)
    if args.reference_endpoint:
        with client_from_args(args, "reference-", model=args.judge_model) as client:
            counters = llava_bench.generate_references(questions, contexts, client, path,
                                                       progress=args.progress)
        print(f"reference answers: ok {counters.ok}, retried {counters.retried}, failed "
              f"{counters.failed}, empty {counters.unparsable} -> {path}", flush=True)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"reference answers {path} do not exist (give "
                                "--reference-endpoint to write them).")
    else:
        have = llava_bench.read_texts(path)
        missing = [q.question_id for q in questions if str(q.question_id) not in have]
        if missing:
            raise ValueError(f"{len(missing)} questions have no reference answer in {path} "
                             f"(first: {missing[0]!r}); give --reference-endpoint to write "
                             "the missing ones.")
    return path


def llava_bench_judge(args: argparse.Namespace, questions: list[Question],
                      reference_path: str) -> dict[str, Any]:
    """Judges the answers not judged yet, then scores all of them."""
    contexts = llava_bench.read_contexts(args.context)
    answers = {str(r["question_id"]): r for r in read_answers(args.output, questions)}
    references = llava_bench.read_texts(reference_path)
    reviews = llava_bench.reviews_path(args.output)
    with client_from_args(args, "judge-") as client:
        counters = llava_bench.judge_answers(questions, answers, references, contexts, client,
                                             reviews, progress=args.progress)
    result = llava_bench.score(questions, answers, references, reviews)
    result.update(judge=counters.as_dict(), reference_file=os.path.abspath(reference_path),
                  judge_model=args.judge_model)
    return result


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Answers (this process's share of) the questions and, on process 0, scores them."""
    for path, what in ((args.data, "question file"), (args.image_folder, "image folder")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist.")
    questions, data, image_root = load_questions(
        args.task, args.data, image_folder=args.image_folder, short_answer=args.short_answer,
        limit=args.limit)
    index, count = jax.process_index(), jax.process_count()
    reference_path = None
    if args.task == "llava_bench" and index == 0:
        reference_path = llava_bench_references(args, questions)  # before hours of answering
    pretrained = load_pretrained(args.checkpoint, dtype=args.dtype)
    if pretrained.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer/ folder; it is needed to build "
                         "prompts (save the model with its tokenizer).")
    template = args.template or checkpoint_template(args.checkpoint)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
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
        model_id=model_id, template=template, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task],
        image_root=image_root, progress=args.progress, make_record=make_record,
        skip=done_ids(args.output) if count > 1 else frozenset(),
        processor=pretrained.processor)
    if count > 1:
        multihost_utils.sync_global_devices("llava_jax.eval answers written")
        if index != 0:
            return None
        merge_shards(args.output, count, questions)
    if args.task == "llava_bench":
        result = llava_bench_judge(args, questions, reference_path)
    else:
        answers = read_answers(args.output, questions)
        result = score_task(args.task, answers, questions, data=data,
                            ground_truth=args.ground_truth,
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
        result = run(args)
    except (FileNotFoundError, ImageDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # llava_bench: failed judge (or reference) requests leave questions unjudged; a rerun
    # asks for those.
    return 1 if result and (result.get("num_unjudged") or result.get("num_no_reference")) else 0


if __name__ == "__main__":
    sys.exit(main())
