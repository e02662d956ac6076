"""The training loop of one stage in one workdir: resume, steps, logging, checkpoints.

    trainer = Trainer(config, workdir); result = trainer.run(); model = trainer.model()

Set-up (tokenizer, model config, shapes, shardings, first parameters) is in state.py, the
step in step.py, the config schema in config.py.

Workdir layout (what `checkpoint.load_pretrained(WORKDIR)` and `llava_jax.convert` read):

    WORKDIR/llava_config.json, tokenizer/, train_config.json (+ lora_config.json: a LoRA run)
    WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}   orbax CheckpointManager
    WORKDIR/checkpoints/<step>.corrupt-<time>/                    a step that did not restore
    WORKDIR/projector/mm_projector.safetensors                   stage 1: original key names
    WORKDIR/tensorboard/                                          event files
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import sys
import threading
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from llava_jax import checkpoint as ckpt
from llava_jax import sharding
from llava_jax.convert.projector import write_projector
from llava_jax.data import make_dataset
from llava_jax.data.pipeline import make_tiling
from llava_jax.data.processor import PREPROCESSOR_FILE
from llava_jax.data.tokenize import IGNORE_INDEX
from llava_jax.models.llava import LlavaModel
from llava_jax.training import metrics as metrics_lib
from llava_jax.training import optim, state
from llava_jax.training.config import check_mesh_fits, validate_config

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a preempted job


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


class CheckpointRestoreError(RuntimeError):
    """Resuming failed: the newest checkpoint does not restore (on_corrupt='fail') or none does."""


class Trainer:
    """One training stage in one workdir: set-up, (resume,) loop, final checkpoint.

    trainer = Trainer(config, workdir); result = trainer.run()
    `result`: dict(step, loss, stopped, history=[(step, loss) at logged/saved steps]);
    `trainer.model()` gives the trained LlavaModel.
    """

    def __init__(self, config, workdir: str, *, mesh=None):
        validate_config(config)
        self.config = c = config
        self.workdir = os.path.abspath(workdir)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(c.mesh)
        check_mesh_fits(c, self.mesh)
        state.prepare_builtin_data(c)
        self.tokenizer = state.load_tokenizer(c)
        self.model_config = state.resolve_model_config(c, self.tokenizer)
        self.total_steps = state.total_steps(c)
        self.setup = state.build_setup(c, self.model_config, self.mesh, self.total_steps)
        self.preprocessor = state.base_preprocessor_config(c)
        self.tiling = None
        if self.model_config.anyres:  # images become tiles; data.aspect does not apply
            self.tiling = make_tiling(self.model_config, c.data, self.preprocessor)
            logging.info("tiled images (%s): %d tile slots per row, pinpoints %s",
                         self.model_config.image_aspect, self.tiling.tiles_per_row,
                         list(self.model_config.image_grid_pinpoints))
        self.trainable = self.frozen = self.opt_state = None
        self.step = 0

    def model(self) -> LlavaModel:
        """The current parameters as a LlavaModel (for evaluation)."""
        return self.setup.model(self.trainable, self.frozen)

    # ----- state -----
    def _manager(self) -> ocp.CheckpointManager:
        ckpt.quiet_orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.checkpoint.max_to_keep, create=True,
            enable_async_checkpointing=self.config.checkpoint.async_save)
        return ocp.CheckpointManager(os.path.join(self.workdir, ckpt.CHECKPOINTS_DIR),
                                     options=options)

    def _fresh_state(self) -> None:
        params = state.initial_params(self.config, self.model_config, self.setup)
        self.trainable, self.frozen = self.setup.split(params)
        self.opt_state = self.setup.init_optimizer(self.trainable)
        self.step = 0

    def _save_args(self, iterator) -> ocp.args.Composite:
        meta = {"step": self.step, "total_steps": self.total_steps,
                "config": json.loads(self.config.to_json_best_effort())}
        return ocp.args.Composite(
            params=ocp.args.StandardSave(optim.merge_params(self.trainable, self.frozen)),
            opt_state=ocp.args.StandardSave(self.opt_state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta))

    def _restore(self, manager, step: int, iterator) -> None:
        setup = self.setup
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(state.with_shardings(setup.abstract, setup.shardings)),
            opt_state=ocp.args.StandardRestore(
                state.with_shardings(setup.abstract_opt, setup.opt_shardings)),
            data=grain.checkpoint.CheckpointRestore(iterator),
            meta=ocp.args.JsonRestore()))
        self.trainable, self.frozen = setup.split(restored["params"])
        self.opt_state = restored["opt_state"]
        self.step = int(restored["meta"]["step"])

    # ----- resume, surviving a corrupt checkpoint -----
    def _resume(self, manager, iterator) -> int | None:
        """Restores the newest checkpoint that restores on every process; its step, or None.

        None only when there is no checkpoint at all (a fresh start). A step that does not
        restore is logged (step, path, error) and, with checkpoint.on_corrupt='fallback', the
        next older one is tried; once one restores, the bad ones are moved aside. 'fail', or
        no step restoring, raises CheckpointRestoreError: checkpoints that exist are never
        silently replaced by a fresh start.
        """
        steps = _agreed_steps(manager.all_steps())
        if not steps:
            return None
        directory = str(manager.directory)
        _warn_unfinished_saves(directory)
        reader = self._restore_manager()
        failed = []  # (step, path, one-line error), newest first
        try:
            for step in steps:
                path = os.path.join(directory, str(step))  # orbax's default step name
                error = _agree_on_error(self._try_restore(reader, step, iterator))
                if error is None:
                    break
                failed.append((step, path, error))
                if self.config.checkpoint.on_corrupt == "fail":
                    raise CheckpointRestoreError(
                        f"checkpoint step {step} ({path}) does not restore: {error}. To resume "
                        f"from the step before it, move or delete {path}, or set "
                        "--config.checkpoint.on_corrupt=fallback (moves it aside to "
                        f"{step}.corrupt-<time> and resumes from the newest step that restores).")
                logging.warning("checkpoint step %d (%s) does not restore: %s; %s", step, path,
                                error, f"trying step {steps[len(failed)]}" if len(failed) <
                                len(steps) else "no older step to try")
            else:
                tried = "; ".join(f"step {step} ({path}): {error}" for step, path, error in failed)
                raise CheckpointRestoreError(
                    f"no checkpoint in {directory} restores (tried steps "
                    f"{', '.join(str(s) for s, _, _ in failed)}, newest first): {tried}. Not "
                    "starting from scratch over existing checkpoints: repair or remove them, or "
                    "use a new --workdir.")
        finally:
            reader.close()
        if failed:
            self._move_aside(manager, failed)
            logging.warning("resumed from step %d, the newest checkpoint that restores (%s "
                            "did not)", self.step, ", ".join(str(s) for s, _, _ in failed))
        return self.step

    def _restore_manager(self) -> ocp.CheckpointManager:
        """A manager that only restores, with this process as its only participant.

        orbax's restore ends in a barrier of all processes, which a process whose restore
        raised never reaches: the others would wait there while it moved on to the next
        collective. Restoring as a group of one skips that barrier (each process reads its own
        shards either way); the processes then agree explicitly (_agree_on_error).
        """
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            create=False, enable_async_checkpointing=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}))
        return ocp.CheckpointManager(os.path.join(self.workdir, ckpt.CHECKPOINTS_DIR),
                                     options=options)

    def _try_restore(self, reader, step: int, iterator) -> str | None:
        """Restores `step` on this process: None, or why not in one line.

        Any exception counts as a bad checkpoint (truncated, missing or garbage files raise
        ValueError, KeyError, JSONDecodeError or tensorstore's bare Exception). Treating a
        transient error as corruption costs a fallback to an older step (the moved-aside
        files stay), never a fresh start or a deleted checkpoint.
        """
        previous_hook = sys.unraisablehook
        sys.unraisablehook = _drop_orbax_read_errors(previous_hook)
        try:
            self._restore(reader, step, iterator)
        except Exception as e:  # noqa: BLE001 -- see the docstring
            return _one_line(e)
        finally:
            # orbax's abandoned read coroutines each print a tensorstore spec dump when they
            # are finalized; finalize them now, while the hook above drops those reports.
            gc.collect()
            sys.unraisablehook = previous_hook
        if self.step != step:
            return f"meta/metadata records step {self.step}, not {step}"
        return None

    def _move_aside(self, manager, failed) -> None:
        """Renames steps that did not restore to <step>.corrupt-<time>, keeping their files.

        Left in place, orbax would keep listing them: latest_step() would pick them again,
        max_to_keep would count them and delete good older steps first, and saving that step
        number again would raise StepAlreadyExistsError. The new name matches none of orbax's
        step patterns (nor checkpoint.params_directory's), so it is ignored from now on.
        """
        if jax.process_index() == 0:  # shared storage: one process renames (as orbax does)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, path, _ in failed:
                if not os.path.isdir(path):  # removed by hand since it was listed
                    continue
                target, n = f"{path}.corrupt-{stamp}", 1
                while os.path.exists(target):
                    n += 1
                    target = f"{path}.corrupt-{stamp}-{n}"
                os.rename(path, target)
                logging.warning("moved checkpoint step %d aside: %s -> %s (kept for inspection; "
                                "delete it when done)", step, path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("llava_jax: corrupt checkpoints moved aside")
        manager.reload()

    def _write_model_files(self) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, ckpt.CONFIG_FILE), "w") as handle:
            json.dump(self.model_config.to_dict(), handle, indent=2)
        self.tokenizer.save_pretrained(os.path.join(self.workdir, ckpt.TOKENIZER_DIR))
        with open(os.path.join(self.workdir, "train_config.json"), "w") as handle:
            handle.write(self.config.to_json_best_effort(indent=2))
        if self.setup.lora is not None:  # load_pretrained / convert read the adapted layout
            ckpt.write_lora_config(self.workdir, self.setup.lora)
        if self.preprocessor is not None:  # the processor inference will use, as trained
            with open(os.path.join(self.workdir, ckpt.TOKENIZER_DIR, PREPROCESSOR_FILE),
                      "w") as handle:
                json.dump(self.preprocessor, handle, indent=2)

    # ----- data -----
    def _dataset(self):
        c, mc = self.config, self.model_config
        return make_dataset(
            c.data, self.tokenizer, num_image_tokens=mc.num_image_tokens,
            image_token_index=mc.image_token_index, image_size=mc.vision.image_size,
            global_batch_size=c.optim.global_batch_size // c.optim.grad_accum_steps, seed=c.seed,
            shard_index=jax.process_index(), shard_count=jax.process_count(),
            pad_id=self.tokenizer.pad_token_id, tiling=self.tiling)

    def _next_batch(self, iterator, preempted=None):
        """grad_accum_steps micro-batches, padded to one length, stacked: host numpy [accum, ...].

        Returns None when the data are exhausted (a partial step is dropped). With several
        processes, the shapes, running out of data (shards yield different numbers of batches)
        and SIGTERM (`preempted["flag"]`, this process's) are agreed in one all-gather, so all
        processes stop at the same step and none waits in a collective the others never join:
        `preempted["agreed"]` becomes True when any process was signalled.
        """
        micro = []
        for _ in range(self.config.optim.grad_accum_steps):
            try:
                micro.append(next(iterator))
            except StopIteration:
                break
        exhausted = len(micro) < self.config.optim.grad_accum_steps
        if jax.process_count() == 1 and exhausted:
            return None
        length = max((m["input_ids"].shape[1] for m in micro), default=0)
        has_images = any(bool(m["image_mask"].any()) for m in micro)
        if jax.process_count() > 1:  # all processes must build the same global shapes
            signalled = bool(preempted is not None and preempted["flag"])
            agreed = multihost_utils.process_allgather(
                np.array([length, has_images, exhausted, signalled], np.int64))
            length, has_images = int(agreed[:, 0].max()), bool(agreed[:, 1].any())
            if preempted is not None:
                preempted["agreed"] = preempted["agreed"] or bool(agreed[:, 3].any())
            if agreed[:, 2].any():
                return None
        # Per-token arrays ([rows, L, ...]; a tiled model's placeholder map too) are padded to
        # the step's length; the image arrays are stacked as they are.
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE_INDEX,
                      "segment_ids": 0, "positions": 0}
        if has_images:
            pad_values |= {name: 0 for name in ("image_feature_index", "image_feature_weight")
                           if name in micro[0]}
        batch = {}
        for name, value in pad_values.items():
            batch[name] = np.stack([np.pad(
                m[name], ((0, 0), (0, length - m[name].shape[1])) + ((0, 0),) * (m[name].ndim - 2),
                constant_values=value) for m in micro])
        if has_images:
            batch["pixel_values"] = np.stack([m["pixel_values"] for m in micro])
            batch["image_mask"] = np.stack([m["image_mask"] for m in micro])
        return batch

    def _step_flops(self, rows: int, length: int, slots: int, with_images: bool) -> float:
        return metrics_lib.train_step_flops(
            self.model_config, rows, length, slots, with_images=with_images,
            train_projector=self.setup.trains_projector, train_llm=self.setup.trains_llm)

    # ----- loop -----
    def run(self) -> dict:
        c = self.config
        self._write_model_files()
        manager = self._manager()
        iterator = self._dataset()
        latest = self._resume(manager, iterator)
        if latest is not None:
            logging.info("resumed from %s at step %d", manager.directory, self.step)
        else:
            self._fresh_state()
        stop_at = self.total_steps if c.max_steps < 0 else min(c.max_steps, self.total_steps)
        # flag: this process got SIGTERM; agreed: some process did (several processes: only
        # the agreed value, from _next_batch's all-gather, stops the loop, at the same step).
        preempted = {"flag": False, "agreed": False}
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)) \
            if _main_thread() else None
        reporter = metrics_lib.ProgressReporter(
            total_steps=stop_at, start_step=self.step, workdir=self.workdir if jax.process_index()
            == 0 else None, tensorboard=c.log.tensorboard, progress_bar=c.log.progress_bar,
            prefix=f"[stage {c.stage}] ")
        peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                                 c.log.peak_flops_per_device)
        window = metrics_lib.StepWindow(self._step_flops)
        last_saved = self.step if latest is not None else None
        loss, stopped, history, lagged = float("nan"), "completed", [], None
        try:
            while self.step < stop_at:
                if preempted["flag" if jax.process_count() == 1 else "agreed"]:
                    stopped = "preempted"
                    break
                started = time.perf_counter()
                host_batch = self._next_batch(iterator, preempted)
                if host_batch is None:
                    stopped = "data exhausted"
                    break
                device_batch = sharding.global_batch(host_batch, self.mesh)
                data_wait = time.perf_counter() - started
                # Traced with the mesh in context: kernels that must run in shard_map (splash
                # attention on a multi-chip TPU) find it there (models/attention.py).
                with jax.set_mesh(self.mesh):
                    self.trainable, self.opt_state, step_metrics = self.setup.train_step(
                        self.trainable, self.frozen, self.opt_state, device_batch)
                self.step += 1
                window.add(host_batch, data_wait)
                due_save = self.step % c.checkpoint.every_steps == 0 or self.step == stop_at
                due_log = self.step % c.log.every_steps == 0 or self.step == stop_at
                # Check the previous step's flag while this one runs (no pipeline stall); steps
                # that save or log are checked at once, so no checkpoint follows a bad step.
                if lagged is not None:
                    _check_finite(jax.device_get(lagged), self.step - 1, last_saved)
                lagged = step_metrics
                if due_save or due_log:
                    values = jax.device_get(step_metrics)
                    _check_finite(values, self.step, last_saved)
                    lagged = None
                    loss = float(values["loss"])
                    history.append((self.step, loss))
                    if due_log:
                        reporter.report(self.step, window.summary(
                            values, peak, float(self.setup.schedule(self.step - 1))))
                if due_save:
                    manager.save(self.step, args=self._save_args(iterator), force=True)
                    last_saved = self.step
                reporter.advance(self.step)
            if self.step >= stop_at and stop_at < self.total_steps:
                stopped = "max_steps"
            if lagged is not None:
                _check_finite(jax.device_get(lagged), self.step, last_saved)
            if last_saved != self.step:
                manager.save(self.step, args=self._save_args(iterator), force=True)
        finally:
            manager.wait_until_finished()
            manager.close()
            reporter.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if c.stage == 1:
            projector = {"multi_modal_projector": optim.merge_params(
                self.trainable, self.frozen)["multi_modal_projector"]}
            if jax.process_count() > 1:  # shards on other processes: gather (all processes)
                projector = multihost_utils.process_allgather(projector, tiled=True)
            if jax.process_index() == 0:
                write_projector(projector, self.model_config,
                                os.path.join(self.workdir, "projector"))
        logging.info("stage %d: %s at step %d/%d (checkpoint in %s)", c.stage, stopped,
                     self.step, self.total_steps, self.workdir)
        if stopped == "preempted":
            raise Preempted(f"SIGTERM: saved step {self.step} to {self.workdir}; run the same "
                            "command again to resume.")
        return {"step": self.step, "loss": loss, "stopped": stopped, "history": history}


def _check_finite(values: dict, step: int, last_saved: int | None) -> None:
    if not values["finite"]:
        raise NonFiniteLossError(
            f"loss={float(values['loss'])}, grad_norm={float(values['grad_norm'])} at step {step}"
            f": stopping before anything of this step is saved; the last checkpoint (step "
            f"{last_saved}) is intact. Lower optim.learning_rate or check the data.")


def _agreed_steps(steps) -> list[int]:
    """Process 0's checkpoint steps, newest first: every process tries the same ones in order."""
    steps = sorted((int(s) for s in steps), reverse=True)
    if jax.process_count() == 1:
        return steps
    count = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
    padded = np.full(count, -1, np.int64)  # same shape on every process; only 0's values count
    padded[:min(count, len(steps))] = steps[:count]
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def _agree_on_error(error: str | None) -> str | None:
    """None if the step restored on every process, else why not (as seen from this process)."""
    if jax.process_count() == 1:
        return error
    restored = np.asarray(multihost_utils.process_allgather(np.int32(error is None))).reshape(-1)
    failed = [i for i, ok in enumerate(restored) if not ok]
    if not failed:
        return None
    where = f"on process{'es' if len(failed) > 1 else ''} {', '.join(map(str, failed))}"
    return f"{where}: {error}" if error is not None else f"{where} (their logs have the error)"


_SPEC_DUMP = re.compile(r"\s*See full TensorStore details:.*", re.DOTALL)
_SOURCE_LOCATIONS = re.compile(r"\s*\[source locations='[^']*'\]")


def _one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: message` of an exception and its causes, on one line, without spec dumps."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen and len(parts) < 4:
        seen.add(id(error))
        text = _SOURCE_LOCATIONS.sub("", _SPEC_DUMP.sub("", str(error)))
        text = " ".join(text.split())
        text = text if len(text) <= limit else text[:limit] + "..."
        parts.append(f"{type(error).__name__}: {text}" if text else type(error).__name__)
        error = error.__cause__ if error.__cause__ is not None else \
            (None if error.__suppress_context__ else error.__context__)
    return " <- ".join(parts)


def _drop_orbax_read_errors(previous_hook):
    """An unraisablehook that drops errors of orbax's coroutines and passes on the rest."""
    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or "orbax" not in code.co_filename:
            previous_hook(unraisable)
    return hook


def _warn_unfinished_saves(directory: str) -> None:
    """Names saves that never finished (orbax ignores them, and leaves them on disk)."""
    unfinished = sorted(name for name in os.listdir(directory) if ".orbax-checkpoint-tmp" in name)
    if unfinished and jax.process_index() == 0:
        logging.warning("%s: unfinished save(s) %s (the run was killed while writing them) are "
                        "ignored; delete them to free the disk space.", directory,
                        ", ".join(unfinished))


def _main_thread() -> bool:  # signal handlers can only be installed there
    return threading.current_thread() is threading.main_thread()
