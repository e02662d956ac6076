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

`evaluate_demo(model, tokenizer)` is the library entry point the training demo calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from llava_jax.evaluation import scorers

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
IMAGE_TOKEN = "<image>"
TASKS = ("demo", "vqa", "pope", "scienceqa")
DEFAULT_MAX_NEW_TOKENS = {"demo": 8, "vqa": 16, "pope": 16, "scienceqa": 64}


@dataclasses.dataclass
class Question:
    """One evaluation item. `text` is the user turn ("<image>\\n..." when there is an image);
    `prompt` is what the answer record's `prompt` field holds (the original's `cur_prompt`)."""

    question_id: Any
    text: str
    image: str | None
    prompt: str
    reference: Any = None  # demo: the answer; others: unused
    category: str | None = None


# ----------------------------------------------------------------------------------------------
# Generation over a list of questions


def load_pixels(path: str, image_size: int, aspect: str) -> np.ndarray:
    """float32 [image_size, image_size, 3] for an image file, with a message naming the file."""
    from llava_jax.data import ImageDecodeError, decode_image, preprocess_image

    try:
        return preprocess_image(decode_image(path), image_size, aspect)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found; check --image-folder.") from None
    except ImageDecodeError as error:
        raise ImageDecodeError(f"{path}: {error}") from error


def answer_questions(model, tokenizer, questions: Sequence[Question], *, template: str,
                     batch_size: int, max_new_tokens: int, image_root: str | None,
                     progress: bool = False, desc: str = "eval") -> Iterable[list[tuple[Question, str]]]:
    """Greedy answers, one list of (question, text) per batch, in question order.

    Every batch is padded to `batch_size` rows (repeating its last question), so all batches
    share one compiled program per prompt-length bucket.
    """
    from llava_jax.data import get_template, tokenize_generation_prompt
    from llava_jax.inference.generation import decode_new_tokens, generate

    config = model.config
    template = get_template(template)
    stop = [template.stop_str] if template.stop_str else []
    size = config.vision.image_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), desc=desc, unit="q", dynamic_ncols=True)
    for start in range(0, len(questions), batch_size):
        batch = list(questions[start:start + batch_size])
        rows = batch + [batch[-1]] * (batch_size - len(batch))
        ids = [tokenize_generation_prompt(q.text, tokenizer, template, config.num_image_tokens,
                                          config.image_token_index) for q in rows]
        length = max(len(row) for row in ids)
        input_ids = np.zeros((len(rows), length), np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for index, row in enumerate(ids):
            input_ids[index, :len(row)], mask[index, :len(row)] = row, 1
        has_image = np.array([q.image is not None for q in rows])
        pixels = image_mask = None
        if has_image.any():
            pixels = np.zeros((len(rows), 1, size, size, 3), np.float32)
            for index, question in enumerate(rows):
                if question.image is not None:
                    path = (question.image if image_root is None
                            else os.path.join(image_root, question.image))
                    pixels[index, 0] = load_pixels(path, size, config.image_aspect)
            image_mask = has_image[:, None]
        tokens = generate(model, input_ids, pixels, attention_mask=mask, image_mask=image_mask,
                          max_new_tokens=max_new_tokens, stop_strings=stop, tokenizer=tokenizer)
        texts = [decode_new_tokens(row, tokenizer, eos_token_id=config.eos_token_id,
                                   stop_strings=stop) for row in tokens[:len(batch)]]
        if bar is not None:
            bar.update(len(batch))
        yield list(zip(batch, texts))
    if bar is not None:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Demo split (library entry point for the training demo)


def read_demo_questions(eval_path: str) -> list[Question]:
    """The demo eval.jsonl lines {question_id, image, text, answer, category} as Questions
    ("<image>\\n" is prepended to the text, as model_vqa does)."""
    questions = []
    for record in scorers.read_jsonl(eval_path):
        text = record["text"]
        if record.get("image"):
            text = f"{IMAGE_TOKEN}\n{text.replace(IMAGE_TOKEN, '').strip()}"
        questions.append(Question(record["question_id"], text, record.get("image"),
                                  record["text"], record.get("answer"), record.get("category")))
    return questions


def score_demo(answers: Sequence[tuple[Question, str]]) -> dict[str, Any]:
    """Exact match overall and per category: {accuracy, num_examples, num_correct, per_category}."""
    result = scorers.exact_match_accuracy([text for _, text in answers],
                                          [q.reference for q, _ in answers])
    per_category: dict[str, list] = {}
    for question, text in answers:
        per_category.setdefault(question.category or "all", []).append((text, question.reference))
    result["per_category"] = {
        category: scorers.exact_match_accuracy(*zip(*pairs))["accuracy"]
        for category, pairs in sorted(per_category.items())
    }
    return result


def evaluate_demo(model, tokenizer, eval_path: str | None = None, *, batch_size: int = 64,
                  image_root: str | None = None, max_new_tokens: int = 8,
                  template: str = "vicuna_v1", limit: int | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Greedy exact-match accuracy of `model` on the demo's held-out split.

    Args:
      model: a LlavaModel whose vocabulary covers the demo tokenizer.
      tokenizer: the demo tokenizer (`llava_jax.data.demo.load_tokenizer()`).
      eval_path: eval.jsonl; default: the prepared demo's (generated on first use).
      image_root: where the images are; default: the prepared demo's image folder when
        eval_path is None, else `images/` beside eval_path.
      limit: evaluate only the first `limit` questions.
    Returns:
      dict(accuracy in [0, 1], num_examples, num_correct, per_category={category: accuracy},
      examples=[first 5 (question, prediction, answer)]).
    """
    if eval_path is None:
        from llava_jax.data import demo

        prepared = demo.prepare()
        eval_path = prepared["eval_file"]
        image_root = image_root or prepared["image_root"]
    elif image_root is None:
        image_root = os.path.join(os.path.dirname(os.path.abspath(eval_path)), "images")
    questions = read_demo_questions(eval_path)[:limit]
    if not questions:
        raise ValueError(f"{eval_path} holds no questions.")
    answers = [pair for batch in answer_questions(
        model, tokenizer, questions, template=template, batch_size=batch_size,
        max_new_tokens=max_new_tokens, image_root=image_root, progress=progress, desc="demo")
        for pair in batch]
    result = score_demo(answers)
    result["examples"] = [(q.prompt, text, q.reference) for q, text in answers[:5]]
    return result


# ----------------------------------------------------------------------------------------------
# Question files of the benchmarks


def with_short_answer_prompt(text: str) -> str:
    text = text.strip()
    return text if text.endswith(SHORT_ANSWER_PROMPT) else f"{text}\n{SHORT_ANSWER_PROMPT}"


def read_vqa_questions(path: str, short_answer: bool = True) -> list[Question]:
    """model_vqa question JSONL ({question_id, image, text[, category]}) -> Questions."""
    questions = []
    for number, record in enumerate(scorers.read_jsonl(path), start=1):
        missing = {"question_id", "text"} - set(record)
        if missing:
            raise ValueError(f"{path}:{number}: missing {sorted(missing)} (model_vqa format "
                             "needs question_id, image, text).")
        prompt = record["text"].replace(IMAGE_TOKEN, "").strip()
        if short_answer:
            prompt = with_short_answer_prompt(prompt)
        text = f"{IMAGE_TOKEN}\n{prompt}" if record.get("image") else prompt
        questions.append(Question(record["question_id"], text, record.get("image"), prompt,
                                  category=record.get("category")))
    return questions


def read_scienceqa_questions(path: str) -> list[Question]:
    """llava_test_CQM-A.json -> Questions with LLaVA-1.5's single-prediction prompt."""
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)
    questions = []
    for record in records:
        prompt = scorers.build_scienceqa_prompt(record)
        questions.append(Question(record["id"], prompt, record.get("image"), prompt))
    return questions


# ----------------------------------------------------------------------------------------------
# Answer files: resume, shards


def done_ids(path: str) -> set[str]:
    """Question ids (as strings) already answered in `path` (a torn last line is ignored)."""
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                ids.add(str(json.loads(line)["question_id"]))
            except (json.JSONDecodeError, KeyError):
                continue  # an interrupted write: that question is answered again
    return ids


def shard_path(output: str, index: int, count: int) -> str:
    if count == 1:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}.{index}-of-{count}{ext or '.jsonl'}"


def _truncate_torn_line(path: str) -> None:
    """Drops a partial last line left by a killed run, so appends start on a fresh line."""
    if not os.path.exists(path) or not os.path.getsize(path):
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def write_answers(model, tokenizer, questions: Sequence[Question], output: str, *,
                  model_id: str, template: str, batch_size: int, max_new_tokens: int,
                  image_root: str | None, progress: bool = True,
                  make_record: Callable[[Question, str], dict] | None = None,
                  skip: set[str] = frozenset()) -> int:
    """Answers the questions not yet in `output` (nor in `skip`), appending one JSON line
    each; returns how many were answered now."""
    _truncate_torn_line(output)
    answered = done_ids(output) | set(skip)
    todo = [q for q in questions if str(q.question_id) not in answered]
    if not todo:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    def default_record(question: Question, text: str) -> dict:
        return {"question_id": question.question_id, "prompt": question.prompt, "text": text,
                "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}

    make_record = make_record or default_record
    with open(output, "a", encoding="utf-8") as handle:
        for batch in answer_questions(model, tokenizer, todo, template=template,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      image_root=image_root, progress=progress):
            handle.writelines(json.dumps(make_record(q, text)) + "\n" for q, text in batch)
            handle.flush()
            os.fsync(handle.fileno())
    return len(todo)


def read_answers(path: str, questions: Sequence[Question]) -> list[dict]:
    """Answer records in question-file order (POPE pairs answers with labels by position);
    the last record of a repeated id wins."""
    by_id = {str(record["question_id"]): record for record in scorers.read_jsonl(path)}
    return [by_id[str(q.question_id)] for q in questions if str(q.question_id) in by_id]


def merge_shards(output: str, count: int, questions: Sequence[Question]) -> None:
    """Process 0 after the barrier: shard files -> `output` in question order."""
    records = ({str(r["question_id"]): r for r in scorers.read_jsonl(output)}
               if os.path.exists(output) else {})
    for index in range(count):
        path = shard_path(output, index, count)
        if os.path.exists(path):
            records.update({str(r["question_id"]): r for r in scorers.read_jsonl(path)})
    with open(output, "w", encoding="utf-8") as handle:
        for question in questions:
            record = records.get(str(question.question_id))
            if record is not None:
                handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Scoring


def score_task(task: str, answers: list[dict], questions: Sequence[Question],
               args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of one task from its answer records (question-file order)."""
    if task == "demo":
        texts = {str(r["question_id"]): r["text"] for r in answers}
        pairs = [(q, texts.get(str(q.question_id), "")) for q in questions]
        result = score_demo(pairs)
        result["num_missing"] = len(questions) - len(answers)
        return result
    if task == "vqa":
        result = {"num_answers": len(answers)}
        if args.ground_truth:
            with open(args.ground_truth, encoding="utf-8") as handle:
                truth = scorers.load_vqa_ground_truth(json.load(handle))
            scored = scorers.score_vqa({r["question_id"]: r["text"] for r in answers}, truth)
            result.update({k: v for k, v in scored.items() if k != "scores"})
        return result
    if task == "pope":
        categories = sorted({q.category for q in questions if q.category})
        if not categories:
            raise ValueError(f"{args.data}: POPE questions need a 'category' field.")
        if not args.pope_annotations:
            raise ValueError("--pope-annotations DIR (with coco_pope_{category}.json) is needed "
                             "to score POPE.")
        labels = {}
        for category in categories:
            path = os.path.join(args.pope_annotations, f"coco_pope_{category}.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found (POPE labels for category "
                                        f"{category!r}).")
            labels[category] = [r["label"] for r in scorers.read_jsonl(path)]
        records = [{"question_id": q.question_id, "category": q.category} for q in questions]
        per_category = scorers.score_pope_by_category(answers, records, labels)
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        return {"per_category": per_category,
                "mean": {k: float(np.mean([m[k] for m in per_category.values()])) for k in keys}}
    if task == "scienceqa":
        for name in ("problems", "pid_splits"):
            if not getattr(args, name):
                raise ValueError(f"--{name.replace('_', '-')} is needed to score ScienceQA.")
        with open(args.problems, encoding="utf-8") as handle:
            problems = json.load(handle)
        with open(args.pid_splits, encoding="utf-8") as handle:
            splits = json.load(handle)
        if args.split not in splits:
            raise ValueError(f"{args.pid_splits} has no split {args.split!r}; has {sorted(splits)}.")
        return scorers.score_scienceqa(answers, problems, splits[args.split])
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def format_result(task: str, result: dict[str, Any]) -> str:
    """Human-readable summary printed at the end of a run."""
    if task == "scienceqa":
        img = result["img_accuracy"]
        return (f"Accuracy: {100 * result['accuracy']:.2f}% "
                f"({result['num_correct']}/{result['num_examples']}), IMG-Accuracy: "
                f"{'-' if img is None else f'{100 * img:.2f}%'} ({result['num_img_examples']}), "
                f"failed to parse: {result['num_failed']}\n"
                + scorers.format_scienceqa_table(result))
    if task == "pope":
        lines = ["category\tacc\tprec\trecall\tf1\tyes_ratio"]
        for category, m in {**result["per_category"], "mean": result["mean"]}.items():
            lines.append(f"{category}\t" + "\t".join(
                f"{100 * m[k]:.2f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")))
        return "\n".join(lines)
    if "accuracy" in result:
        return f"Accuracy: {100 * result['accuracy']:.2f}% over {result['num_examples']} questions"
    return f"{result.get('num_answers', 0)} answers written (no ground truth given: not scored)"


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
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
    args = parser.parse_args(argv)
    if args.task != "demo" and not args.data:
        parser.error(f"--data (the question file) is required for --task={args.task}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def load_questions(args: argparse.Namespace) -> tuple[list[Question], str | None]:
    """(questions, image root) of the task."""
    if args.task == "demo":
        data, image_root = args.data, args.image_folder
        if data is None:
            from llava_jax.data import demo

            prepared = demo.prepare()
            data, image_root = prepared["eval_file"], image_root or prepared["image_root"]
        elif image_root is None:
            image_root = os.path.join(os.path.dirname(os.path.abspath(data)), "images")
        args.data = data
        questions = read_demo_questions(data)
    elif args.task == "scienceqa":
        questions, image_root = read_scienceqa_questions(args.data), args.image_folder
    else:
        questions = read_vqa_questions(args.data, args.short_answer)
        image_root = args.image_folder
    if not questions:
        raise ValueError(f"{args.data} holds no questions.")
    return questions[:args.limit], image_root


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Answers (this process's share of) the questions and, on process 0, scores them."""
    import jax

    from llava_jax.checkpoint import load_pretrained

    for path, what in ((args.data, "question file"), (args.image_folder, "image folder")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist.")
    questions, image_root = load_questions(args)
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
    write_answers(
        pretrained.model, pretrained.tokenizer, questions[index::count], own_path,
        model_id=model_id, template=args.template, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task],
        image_root=image_root, progress=args.progress, make_record=make_record,
        skip=done_ids(args.output) if count > 1 else frozenset())
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llava_jax.eval answers written")
        if index != 0:
            return None
        merge_shards(args.output, count, questions)
    answers = read_answers(args.output, questions)
    result = score_task(args.task, answers, questions, args)
    result.update(task=args.task, checkpoint=os.path.abspath(args.checkpoint),
                  data=os.path.abspath(args.data), answers_file=os.path.abspath(args.output))
    results_path = args.results or os.path.splitext(args.output)[0] + "_results.json"
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(format_result(args.task, result))
    print(f"answers: {args.output}\nresults: {results_path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from llava_jax.data import ImageDecodeError

    try:
        run(args)
    except (FileNotFoundError, ImageDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
