"""Smoke test of the train-step benchmark: both sides run the same model on the same batch.

Timings are not asserted (they belong in the bench); the first losses are: with no warm-up
step both sides score the same initial weights, so they must agree.
"""

import pytest

pytest.importorskip("torch")


def test_bench_train_runs_both_sides_from_the_same_weights(capsys):
    from llava_jax.bench import train as bench_train

    result = bench_train.main(["--dtypes=float32", "--repeats=1", "--warmup=0"])
    rows = {row["side"]: row for row in result["rows"]}
    assert set(rows) == {"llava_jax", "torch", "llava_jax+lora"}
    assert rows["llava_jax"]["first_loss"] == pytest.approx(rows["torch"]["first_loss"], abs=2e-4)
    # LoRA starts as the base model (B = 0) and holds no optimizer state for the LLM's weights.
    assert rows["llava_jax+lora"]["first_loss"] == pytest.approx(rows["llava_jax"]["first_loss"],
                                                                 abs=1e-6)
    assert rows["llava_jax+lora"]["peak_bytes"] < rows["llava_jax"]["peak_bytes"]
    # The LM head runs on the labelled half of each row: fewer executed than model FLOPs.
    assert result["llava_jax_executed_flops_per_step"] < result["model_flops_per_step"]
    assert result["speedup_best"] == pytest.approx(result["speedup_float32"])
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen2"])  # the most switches: GQA, biases, tied, SigLIP
def test_bench_train_family_models_agree_with_transformers_classes(family):
    """`--family` swaps in the family's switches (window / GQA / biases / SigLIP) on both sides:
    transformers' MistralModel / Qwen2Model must score the same weights as llava_jax."""
    from llava_jax.bench import train as bench_train

    result = bench_train.main(["--dtypes=float32", "--repeats=1", "--warmup=0",
                               "--lora_rank=0", f"--family={family}"])
    rows = {row["side"]: row for row in result["rows"]}
    assert result["family"] == family and set(rows) == {"llava_jax", "torch"}
    assert rows["llava_jax"]["first_loss"] == pytest.approx(rows["torch"]["first_loss"], abs=2e-4)
    config = bench_train.bench_config("float32", family)
    assert config.text.model_type == family and config.text.num_kv_heads < config.text.num_heads


def test_bench_train_next_tiles_as_llava_next(capsys):
    """`--family=next`: the tiled training batch (a wide, a landscape, a tall and a portrait
    image: 3 / 5 / 3 / 5 tiles) scores as transformers' LlavaNextForConditionalGeneration on the
    same tiles + image_sizes; model FLOPs count the real tiles (16), not one image per row."""
    from llava_jax.bench import train as bench_train
    from llava_jax.training import metrics

    result = bench_train.main(["--dtypes=float32", "--repeats=1", "--warmup=0",
                               "--lora_rank=0", "--family=next"])
    rows = {row["side"]: row for row in result["rows"]}
    assert result["family"] == "next" and set(rows) == {"llava_jax", "torch"}
    assert rows["llava_jax"]["first_loss"] == pytest.approx(rows["torch"]["first_loss"], abs=2e-4)
    config = bench_train.bench_config("float32", "next")
    assert config.anyres and [t for _, t in bench_train.image_rows(config)] == [3, 5, 3, 5]
    assert result["model_flops_per_step"] == pytest.approx(metrics.train_step_flops(
        config, 4, bench_train.row_length(config), 4, train_projector=True, train_llm=True),
        rel=1e-9)
    assert "llava_jax best (float32) / torch best (float32) tokens/s: " in capsys.readouterr().out
