"""End to end against a real OpenAI-compatible endpoint on localhost: `python -m llava_jax.serve`
with a tiny random model (one server process for the module) is the "LLM" of datagen (COCO-format
annotations -> JSONL -> LLaVA JSON that the data pipeline loads) and the judge of
`--task=llava_bench`. A random model writes garbage, so the checks are on the bookkeeping:
every request is ok, unparsable or failed; only usable replies become samples; unparsable
judgements are -1 / -1 and counted."""

import json
import os

import pytest

from llava_jax import eval as llava_eval
from llava_jax.datagen import __main__ as datagen
from llava_jax.datagen.parse import parse_reply

# tests/ is on sys.path under pytest; `bench` is a fixture (a question set on disk).
from conftest import serve_process
from test_datagen import write_coco
from test_llava_bench import QUESTIONS, _lines, bench  # noqa: F401

pytestmark = pytest.mark.xdist_group("llm_endpoint")  # one server for the module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny-llm"


@pytest.fixture(scope="module")
def endpoint(tiny_demo_checkpoint, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    args = ["--max-batch=4", "--prefill-batch=4", "--context=1024", "--max-tokens=48",
            f"--model-name={MODEL}", "--log-level=warning", "--warmup=none"]
    with serve_process(tiny_demo_checkpoint, args, log) as (url, _):
        yield f"{url}/v1"


def _short_prompts(folder):
    """A prompt folder small enough for the tiny model's 1024-token context."""
    kind = folder / "detail"
    kind.mkdir(parents=True)
    (kind / "system.txt").write_text("Describe the picture in detail.")
    (kind / "001_context.txt").write_text("Captions:\nA red ball.\n\nObjects:\n"
                                          "ball: [0.100, 0.100, 0.500, 0.500]")
    (kind / "001_reply.txt").write_text("A red ball lies in the upper left of the picture.")
    (kind / "instructions.txt").write_text("Describe this image.\nWhat is in this picture?\n")
    return str(folder)


def _check_run(summary, output, kind, images):
    assert summary["ok"] + summary["unparsable"] + summary["failed"] == images
    assert summary["retried"] == 0 and summary["not_sent"] == 0
    written = _lines(output) if os.path.exists(output) else []
    rejected = _lines(summary["rejected"]) if os.path.exists(summary["rejected"]) else []
    assert len(written) == summary["ok"] and len(rejected) == summary["unparsable"]
    assert sum(summary["reasons"].values()) == summary["unparsable"]
    for record in written:  # what was written is a well-formed sample
        turns = record["conversations"]
        assert turns and len(turns) % 2 == 0 and all(t["value"].strip() for t in turns)
        assert all("<image>" not in t["value"] for t in turns)
    for record in rejected:  # what was not, would not parse
        instruction = "Describe this image." if kind == "detail" else None
        assert not parse_reply(kind, record["reply"], instruction=instruction,
                               truncated=record["finish_reason"] == "length").ok
    return written


def test_datagen_against_the_served_model(endpoint, tmp_path, tiny_demo_checkpoint):
    from llava_jax.data import default_data_config, demo, make_dataset, skip_counts

    names = [f"coco{i}.png" for i in range(4)]
    spec = write_coco(str(tmp_path), names)
    common = [f"--annotations={spec}", f"--endpoint={endpoint}", f"--model={MODEL}",
              "--no-progress", "--concurrency=4", "--retries=1"]
    detail = str(tmp_path / "detail.jsonl")
    llava = str(tmp_path / "llava.json")
    summary = datagen.run(datagen.parse_args(
        common + ["--kind=detail", f"--output={detail}", "--max-tokens=48",
                  # Sampled (seeded: the same every run): the random model's greedy text is
                  # one word repeated, its samples hold sentences to keep.
                  "--temperature=1", "--sampling-seed=0",
                  f"--prompts={_short_prompts(tmp_path / 'prompts')}", f"--to-llava={llava}"]))
    assert summary["failed"] == 0  # the prompts fit the context
    written = _check_run(summary, detail, "detail", len(names))
    assert summary["tokens"] > 0 and summary["llava"]["samples"] == len(written)

    # The package's prompts (system message only) through the same server.
    conversation = str(tmp_path / "conversation.jsonl")
    summary = datagen.run(datagen.parse_args(
        common + ["--kind=conversation", f"--output={conversation}", "--max-tokens=32",
                  "--temperature=0",
                  "--few-shot=0"]))
    _check_run(summary, conversation, "conversation", len(names))

    # A rerun has nothing left to ask.
    again = datagen.run(datagen.parse_args(common + ["--kind=detail", f"--output={detail}",
                                                     f"--prompts={tmp_path / 'prompts'}"]))
    assert again["already_done"] == len(names)
    assert again["ok"] + again["unparsable"] + again["failed"] == 0

    # 48 sampled tokens of the demo vocabulary nearly always hold a sentence end and five
    # words before it: the descriptions cut there are kept (the seeded run keeps all four).
    samples = json.load(open(llava))
    assert samples
    tokenizer = demo.load_tokenizer()
    config = default_data_config(stage=2)
    config.json_paths = (llava,)
    config.image_roots = (str(tmp_path / "images"),)
    config.update(aspect="square", max_length=512, buckets=(512,), packing=False,
                  max_images_per_row=1, use_index_cache=False, shuffle=False)
    iterator = make_dataset(config, tokenizer, num_image_tokens=16,
                            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                            image_size=32, batch_size=2, shard_index=0, shard_count=1)
    rows = sum(int((batch["segment_ids"] > 0).any(axis=1).sum()) for batch in iterator)
    assert rows == len(samples) and skip_counts(iterator) == {}


def test_llava_bench_with_the_served_model_as_judge(endpoint, bench, tmp_path,
                                                   tiny_demo_checkpoint):
    reference = tmp_path / "reference.jsonl"
    with open(reference, "w") as handle:
        for qid, _, text in QUESTIONS:
            handle.write(json.dumps({"question_id": qid, "text": f"A short answer to: {text}"})
                         + "\n")
    argv = ["--task=llava_bench", f"--checkpoint={tiny_demo_checkpoint}",
            f"--data={bench / 'questions.jsonl'}", f"--image-folder={bench / 'images'}",
            f"--context={bench / 'context.jsonl'}", f"--reference={reference}",
            f"--output={bench / 'answers.jsonl'}", f"--judge-endpoint={endpoint}",
            f"--judge-model={MODEL}", "--judge-max-tokens=16", "--judge-retries=1",
            "--batch-size=4", "--max-new-tokens=8", "--no-progress"]
    assert llava_eval.main(argv) == 0
    reviews = _lines(bench / "answers_reviews.jsonl")
    assert sorted(r["question_id"] for r in reviews) == [q[0] for q in QUESTIONS]
    for review in reviews:
        if review["parsed"]:
            assert all(0 <= s <= 10 for s in review["scores"])
        else:
            assert review["scores"] == [-1, -1]
    unparsable = sum(not r["parsed"] for r in reviews)
    results = json.load(open(bench / "answers_results.json"))
    assert results["overall"]["num_reviews"] == len(QUESTIONS)
    assert results["overall"]["num_unparsable"] == unparsable
    assert results["judge"]["unparsable"] == unparsable
    assert results["judge"]["ok"] == len(QUESTIONS) - unparsable
    assert set(results["per_category"]) == {"conversation", "detail", "complex"}
    if unparsable == len(QUESTIONS):
        assert results["overall"]["reference_mean"] == -1
        assert results["overall"]["relative_score"] is None

