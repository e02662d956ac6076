"""Training: the config schema, optimizer, loss, step, state set-up, loop, metrics, memory plan.

    config.py       default_config(stage) (every field, its default, a comment) + validation
    optim.py        the trainable / frozen split, AdamW with LLaVA's settings, the schedule
    loss.py         next-token cross-entropy on target tokens, LM head in chunks
    step.py         make_train_step: the pure (state, batch) -> state function
    state.py        set-up: tokenizer, model config, TrainSetup (shapes, shardings, the jitted
                    step), first parameters, the stage-1 projector import
    trainer.py      Trainer: the loop (resume, log, checkpoint, preemption)
    metrics.py      FLOPs, progress bar, TensorBoard
    memory_plan.py  per-device memory of a config, compiled ahead of time

May import models/, data/, tree, sharding, checkpoint and convert.projector (the stage-1
projector file); nothing of inference/ or evaluation/. `python -m llava_jax.train` is the CLI.
"""
