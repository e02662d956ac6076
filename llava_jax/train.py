"""`python -m llava_jax.train --config=configs/finetune.py:7b --workdir=DIR [--config.X=V ...]`

A config is one training stage (configs/pretrain.py, configs/finetune.py) or a pipeline of
stages (configs/demo.py: `config.stages = ('stage1', 'stage2')`), each run in DIR/<name> and
each later stage starting from the previous stage's output. An existing workdir resumes.
After training, `config.eval.file` (if set) is evaluated and DIR/eval_results.json written.
"""

from __future__ import annotations

import json
import logging as logging_lib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from llava_jax import sharding
from llava_jax.evaluation import evaluate_demo
from llava_jax.training.trainer import (
    EXIT_PREEMPTED,
    CheckpointRestoreError,
    NonFiniteLossError,
    Preempted,
    Trainer,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output / resume directory.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
    """Trains every stage of `config` in `workdir`, then evaluates; returns the summary."""
    # Before anything touches a device: jax.distributed must start first.
    sharding.maybe_initialize_distributed(config.get("distributed", "auto"))
    stage_names = tuple(config.stages) if "stages" in config else (None,)
    summary, previous, trainer = {}, None, None
    for name in stage_names:
        stage = config if name is None else config[name].copy_and_resolve_references()
        stage_dir = workdir if name is None else os.path.join(workdir, name)
        if name is not None and previous is not None and not stage.model.base_dir:
            with stage.unlocked():
                stage.model.base_dir = previous  # start from the previous stage's output
        del trainer  # free the previous stage's arrays first
        trainer = Trainer(stage, stage_dir)
        summary[name or f"stage{stage.stage}"] = trainer.run()
        previous = stage_dir
    evaluation = config.eval if name is not None else stage.eval
    if evaluation.file:
        results = evaluate_demo(
            trainer.model(), trainer.tokenizer, evaluation.file,
            image_root=evaluation.image_root or None, batch_size=evaluation.batch_size,
            max_new_tokens=evaluation.max_new_tokens, template=stage.data.template,
            limit=evaluation.get("limit") or None)
        summary["eval"] = results
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "eval_results.json"), "w") as handle:
                json.dump(results, handle, indent=2)
        print(json.dumps({key: results[key] for key in ("accuracy", "num_examples",
                                                       "per_category") if key in results}),
              flush=True)
    return summary


class _QuietLibraries(logging_lib.Filter):
    """Drops INFO chatter of orbax (a few lines per save) from the console."""

    def filter(self, record):
        return record.levelno >= logging_lib.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        logging.warning("%s", e)
        sys.exit(EXIT_PREEMPTED)
    except (NonFiniteLossError, CheckpointRestoreError) as e:  # raised on every process alike
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    except (Exception, KeyboardInterrupt):
        if not (jax.distributed.is_initialized() and jax.process_count() > 1):
            raise
        # One process failing on its own: the others wait in a collective, so the exit barrier
        # jax.distributed runs at interpreter exit would hold this process for minutes. Exit now,
        # so the launcher (launch/local.py) or scheduler (srun --kill-on-bad-exit) sees the
        # failure and stops the job.
        logging.exception("process %d of %d failed; exiting at once", jax.process_index(),
                          jax.process_count())
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    app.run(main)
