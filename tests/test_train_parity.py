"""Training parity with PyTorch (issue 14): our train step against transformers +
torch.optim.AdamW + get_cosine_schedule_with_warmup + clip_grad_norm_, from the same weights
on the same batches of our pipeline (llava_jax/bench/parity.py has the rules; the 50-step run
is `python -m llava_jax.bench train --parity`, results in BUILD_NOTES.md).

Shorter runs of a tinier set-up than the bench, but the same comparison and tolerances
(loss 1e-3 relative at every step, final trainable parameters 1e-4 absolute). Deliberately
wrong torch references (schedule one step early, warm-up rounded down, decay on norms and
biases, the mean of micro-batch means, None grads skipped) must fail it: the comparison can
tell those apart.
"""

import pytest

pytest.importorskip("torch")

from llava_jax.bench import parity  # noqa: E402


def check(result):
    diff = result["reference"]["diff"]
    assert diff["passed"], {k: v for k, v in diff.items() if k != "loss_rel"}
    assert diff["max_loss_rel"] <= parity.LOSS_RTOL and diff["max_param_abs"] <= parity.PARAM_ATOL
    # The comparison means something: the loss fell and the parameters moved well beyond the
    # tolerance.
    losses = result["ours"]["losses"]
    assert losses[-1] < losses[0] - 0.02
    assert diff["max_param_moved"] > 20 * parity.PARAM_ATOL
    return diff


def test_stage2_packed_with_accumulation_matches_torch(tmp_path):
    # Packed rows (ours) vs the same samples one per row (torch), 2 micro-batches per step
    # (their target counts differ: the mean of micro-batch means is detected below),
    # multi-round conversations with 0, 1 or 2 images, all-text steps.
    # Full remat: the layers' gradients go into the sum inside the backward (the production
    # path of accumulation, models/accumulate.py).
    case = parity.Case(stage=2, steps=8, rows=2, accum=2, length=128, samples=64,
                       text_share=0.6, warmup_ratio=0.2, weight_decay=0.5, remat_policy="full")
    result = parity.run_case(case, str(tmp_path), ("reference",) + parity.REFERENCE_VARIANTS)
    batches = result["batches"]
    assert batches["samples"] > batches["rows"]  # packed
    assert batches["text_steps"] >= 1 and batches["image_micro_batches"] >= 1
    check(result)
    assert result["ours"]["lrs"][:3] == pytest.approx([0.0, 5e-4, 1e-3])  # ceil(1.6) warm-up
    for variant in parity.REFERENCE_VARIANTS:
        assert not result[variant]["diff"]["passed"], f"{variant} was not detected"


def test_stage1_projector_only_unpacked_matches_torch(tmp_path):
    case = parity.Case(stage=1, steps=6, rows=4, accum=1, packing=False, length=96, samples=32,
                       warmup_ratio=0.2, weight_decay=0.5)
    # (One micro-batch per step: the mean of micro-batch means is the same rule here; no text.)
    wrong = ("schedule_one_step_early", "warmup_steps_floor", "decay_norms_and_biases")
    result = parity.run_case(case, str(tmp_path), ("reference",) + wrong)
    assert result["batches"]["samples"] == result["batches"]["rows"]  # one sample per row
    assert set(result["ours"]["final"]) >= set(result["reference"]["torch"]["final"])
    assert all(name.startswith("model.multi_modal_projector.")
               for name in result["reference"]["torch"]["final"])
    check(result)
    for variant in wrong:
        assert not result[variant]["diff"]["passed"], f"{variant} was not detected"


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_matches_transformers_at_every_step(schedule):
    # The learning rate of optimizer step k (1-based) is transformers' lr_lambda(k - 1): the
    # scheduler steps after the optimizer, so the first step runs at 0 after warm-up. Warm-up
    # is ceil(warmup_ratio x steps) (TrainingArguments.get_warmup_steps), short runs included.
    import math

    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import torch
    import transformers

    from llava_jax.training import optim

    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "constant": lambda opt, warmup, _: transformers.get_constant_schedule_with_warmup(
                opt, warmup)}[schedule]
    steps = jnp.arange(128)  # one shape: jnp's eager ops compile once
    for total in (1, 2, 3, 7, 50, 100, 101):  # 0.03 x 100 = 3.0000000000000004: 4 on both
        for ratio in (0.0, 0.03, 0.1, 0.5, 0.9):
            config = ml_collections.ConfigDict(
                {"learning_rate": 2e-5, "warmup_ratio": ratio, "schedule": schedule})
            ours = np.asarray(optim.make_schedule(config, total)(steps))[:total]
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
            scheduler = make(optimizer, math.ceil(total * ratio), total)
            theirs = []
            for _ in range(total):
                theirs.append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12,
                                       err_msg=f"{schedule}, {total} steps, warm-up {ratio}")
