"""Evaluation tasks: question files -> Questions -> greedy answers -> metrics.

Owns the task table (TASKS, DEFAULT_MAX_NEW_TOKENS), the Question record, the readers of each
benchmark's question file, batched greedy answering (`answer_questions`), the demo library
entry point (`evaluate_demo`, which the training demo calls), per-task scoring (`score_task`)
and the printed summary (`format_result`). Every function takes explicit parameters; the
command line (`llava_jax/eval.py`) turns its flags into these calls.

May import tree/, models/, data/, checkpoint and inference/ (tests/test_layout.py); nothing of
training/ or convert/. The metrics themselves are in `scorers` (pure Python).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from llava_jax.data import IMAGE_TOKEN, SHORT_ANSWER_PROMPT, demo, get_template
from llava_jax.evaluation import scorers
from llava_jax.inference.batch import Prompt, build_inputs, load_image
from llava_jax.inference.generation import decode_new_tokens, generate

TASKS = ("demo", "vqa", "pope", "scienceqa", "llava_bench")
# LLaVA-1.5's scripts/v1_5/eval/*.sh budgets (the demo's answers are a word or two;
# LLaVA-Bench's are open-ended: model_vqa.py's default of 1024).
DEFAULT_MAX_NEW_TOKENS = {"demo": 8, "vqa": 16, "pope": 16, "scienceqa": 64, "llava_bench": 1024}
# The POPE metrics averaged over categories ("mean") and printed, in eval_pope.py's order.
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


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


def answer_questions(model, tokenizer, questions: Sequence[Question], *, template: str,
                     batch_size: int, max_new_tokens: int, image_root: str | None,
                     progress: bool = False, desc: str = "eval",
                     processor=None) -> Iterable[list[tuple[Question, str]]]:
    """Greedy answers, one list of (question, text) per batch, in question order.

    Each batch becomes `inference.batch.build_inputs` rows: input_ids / attention_mask int32
    [batch_size, longest prompt], pixel_values float32 [batch_size, 1, S, S, 3] (S the vision
    tower's image size; None when no question of the batch has an image), or for a tiled
    (anyres) model [batch_size, 1, tiles, S, S, 3] with image_feature_index / weight
    [batch_size, P, 4] (each image's tiles and placeholder count from its size, through
    `processor`: the checkpoint's, default the model config's). Every batch is padded to
    `batch_size` rows (repeating its last question), so all batches share one compiled program
    per prompt-length bucket (a tiled model's also varies with the batch's tile count). A
    missing or undecodable image raises FileNotFoundError / ImageDecodeError naming the file.
    """
    config = model.config
    stop_str = get_template(template).stop_str
    stop = [stop_str] if stop_str else []
    bar = (tqdm(total=len(questions), desc=desc, unit="q", dynamic_ncols=True)
           if progress else None)
    for start in range(0, len(questions), batch_size):
        batch = list(questions[start:start + batch_size])
        prompts = []
        for question in batch:
            image = None
            if question.image is not None:
                path = (question.image if image_root is None
                        else os.path.join(image_root, question.image))
                image = load_image(path)
            prompts.append(Prompt(text=question.text, image=image))
        # The padding rows reuse the last prompt (and its decoded image) as they are.
        prompts += [prompts[-1]] * (batch_size - len(batch))
        inputs = build_inputs(prompts, tokenizer, template, config, processor)
        tokens = generate(model, inputs.input_ids, inputs.pixel_values,
                          attention_mask=inputs.attention_mask, **inputs.image_kwargs(),
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


def resolve_demo_paths(eval_path: str | None,
                       image_root: str | None) -> tuple[str, str | None]:
    """(eval.jsonl, image root) of the demo split: the prepared demo's (generated on first use)
    when `eval_path` is None, else `images/` beside `eval_path` unless `image_root` is given."""
    if eval_path is None:
        prepared = demo.prepare()
        return prepared["eval_file"], image_root or prepared["image_root"]
    if image_root is None:
        image_root = os.path.join(os.path.dirname(os.path.abspath(eval_path)), "images")
    return eval_path, image_root


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
    eval_path, image_root = resolve_demo_paths(eval_path, image_root)
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
    """`text` stripped, with LLaVA-1.5's short-answer instruction appended unless it already
    ends with it (some released question files carry it, some do not)."""
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


def load_questions(task: str, data: str | None, *, image_folder: str | None = None,
                   short_answer: bool = True,
                   limit: int | None = None) -> tuple[list[Question], str, str | None]:
    """(questions, question file, image root) of a task.

    Args:
      task: one of TASKS ("pope" and "llava_bench" questions are read as model_vqa JSONL, like
        "vqa"; llava_bench never gets the short-answer instruction).
      data: the question file; for "demo" None means the built-in split.
      image_folder: the image root; for "demo" None means `images/` beside the question file.
      short_answer: vqa/pope: append the short-answer instruction.
      limit: keep only the first `limit` questions.
    Returns the question file actually read (the demo's resolved path when `data` is None),
    for the results record. Raises ValueError when the file holds no questions.
    """
    if task == "demo":
        data, image_root = resolve_demo_paths(data, image_folder)
        questions = read_demo_questions(data)
    elif task == "scienceqa":
        questions, image_root = read_scienceqa_questions(data), image_folder
    elif task == "llava_bench":
        questions, image_root = read_vqa_questions(data, short_answer=False), image_folder
    else:
        questions, image_root = read_vqa_questions(data, short_answer), image_folder
    if not questions:
        raise ValueError(f"{data} holds no questions.")
    return questions[:limit], data, image_root


# ----------------------------------------------------------------------------------------------
# Scoring


def score_task(task: str, answers: list[dict], questions: Sequence[Question], *,
               data: str | None = None, ground_truth: str | None = None,
               pope_annotations: str | None = None, problems: str | None = None,
               pid_splits: str | None = None, split: str = "test") -> dict[str, Any]:
    """Metrics of one task from its answer records (question-file order).

    Args:
      data: the question file (named in error messages).
      ground_truth: vqa: TextVQA / VQAv2 annotation JSON; without it only counts are reported.
      pope_annotations: pope: folder with coco_pope_{category}.json (required).
      problems, pid_splits, split: scienceqa: problems.json, pid_splits.json and the split
        of it to score (required).
    The messages name the command line's flags, which is where these come from in practice.
    """
    if task == "demo":
        texts = {str(r["question_id"]): r["text"] for r in answers}
        pairs = [(q, texts.get(str(q.question_id), "")) for q in questions]
        result = score_demo(pairs)
        result["num_missing"] = len(questions) - len(answers)
        return result
    if task == "vqa":
        result = {"num_answers": len(answers)}
        if ground_truth:
            with open(ground_truth, encoding="utf-8") as handle:
                truth = scorers.load_vqa_ground_truth(json.load(handle))
            scored = scorers.score_vqa({r["question_id"]: r["text"] for r in answers}, truth)
            result.update({k: v for k, v in scored.items() if k != "scores"})
        return result
    if task == "pope":
        categories = sorted({q.category for q in questions if q.category})
        if not categories:
            raise ValueError(f"{data}: POPE questions need a 'category' field.")
        if not pope_annotations:
            raise ValueError("--pope-annotations DIR (with coco_pope_{category}.json) is needed "
                             "to score POPE.")
        labels = {}
        for category in categories:
            path = os.path.join(pope_annotations, f"coco_pope_{category}.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found (POPE labels for category "
                                        f"{category!r}).")
            labels[category] = [r["label"] for r in scorers.read_jsonl(path)]
        records = [{"question_id": q.question_id, "category": q.category} for q in questions]
        per_category = scorers.score_pope_by_category(answers, records, labels)
        mean = {k: float(np.mean([m[k] for m in per_category.values()])) for k in POPE_METRICS}
        return {"per_category": per_category, "mean": mean}
    if task == "scienceqa":
        if not problems:
            raise ValueError("--problems is needed to score ScienceQA.")
        if not pid_splits:
            raise ValueError("--pid-splits is needed to score ScienceQA.")
        with open(problems, encoding="utf-8") as handle:
            problem_records = json.load(handle)
        with open(pid_splits, encoding="utf-8") as handle:
            splits = json.load(handle)
        if split not in splits:
            raise ValueError(f"{pid_splits} has no split {split!r}; has {sorted(splits)}.")
        return scorers.score_scienceqa(answers, problem_records, splits[split])
    if task == "llava_bench":
        raise ValueError("llava_bench is scored by an LLM judge: llava_jax.evaluation.llava_bench"
                         " (python -m llava_jax.eval --task=llava_bench --judge-endpoint=...)")
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def format_result(task: str, result: dict[str, Any]) -> str:
    """Human-readable summary printed at the end of a run."""
    if task == "llava_bench":
        from llava_jax.evaluation.llava_bench import format_results

        return format_results(result)
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
            lines.append(f"{category}\t" + "\t".join(f"{100 * m[k]:.2f}" for k in POPE_METRICS))
        return "\n".join(lines)
    if "accuracy" in result:
        return f"Accuracy: {100 * result['accuracy']:.2f}% over {result['num_examples']} questions"
    return f"{result.get('num_answers', 0)} answers written (no ground truth given: not scored)"
