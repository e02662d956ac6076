"""Evaluation: benchmark questions -> greedy answers -> the original LLaVA scripts' metrics.

    scorers.py  pure-Python metrics (ScienceQA, VQA soft accuracy, POPE, exact match)
    tasks.py    TASKS, Question, question readers, answer_questions, evaluate_demo,
                score_task, format_result
    answers.py  answers JSONL: resume (done_ids), shards (shard_path, merge_shards),
                write_answers, read_answers
    llava_bench.py   LLaVA-Bench: the LLM judge's prompt, score parsing, relative scores,
                resumable judgements and reference answers (pure Python)
    openai_client.py the OpenAI-compatible client (concurrency, retries, budgets) of every
                LLM-judged task, and of llava_jax.datagen (pure Python + httpx)

`python -m llava_jax.eval` (llava_jax/eval.py) is the command line over these;
`evaluate_demo(model, tokenizer)` is the library entry point the training demo calls.

May import tree/, models/, data/, checkpoint and inference/; nothing of training/ or convert/
(tests/test_layout.py).
"""

import importlib

# tasks/answers import jax (through inference/); importing them here would load jax for
# `import llava_jax.evaluation.scorers` too, which must stay jax-free so that answers can be
# scored without an accelerator stack (tests/test_scorers.py::test_scorers_do_not_import_jax).
# Measured: `python -c "import llava_jax.evaluation.scorers"` 0.2 s, `...tasks` 2.2 s.
# So they load on first use.
_LAZY = {
    **{name: "llava_jax.evaluation.tasks" for name in (
        "TASKS", "DEFAULT_MAX_NEW_TOKENS", "Question", "answer_questions", "evaluate_demo",
        "load_questions", "read_demo_questions", "read_vqa_questions",
        "read_scienceqa_questions", "score_demo", "score_task", "format_result")},
    **{name: "llava_jax.evaluation.answers" for name in (
        "done_ids", "shard_path", "write_answers", "read_answers", "merge_shards")},
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llava_jax.evaluation' has no attribute {name!r}")
