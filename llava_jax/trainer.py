"""LLaVA training: state set-up, the jitted train step, and the loop (schema: train_config.py).

State is three nested dicts of jax.Arrays: `trainable` and `frozen` parameters (split by a
regex on the parameter path, see optim.py) and the optax state of the trainable ones. The
step is one pure function under `jax.jit` with explicit shardings:

    batch [accum, rows, ...] --loop over micro-batches--> summed grads / #target tokens
          --> clip + AdamW --> new trainable params (update skipped if the loss is not finite)

Workdir layout (what `checkpoint.load_pretrained(WORKDIR)` and `llava_jax.convert` read):

    WORKDIR/llava_config.json, tokenizer/
    WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}   orbax CheckpointManager
    WORKDIR/projector/mm_projector.safetensors                   stage 1: original key names
    WORKDIR/tensorboard/                                          event files
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import checkpoint as ckpt
from llava_jax import metrics as metrics_lib
from llava_jax import optim, sharding
from llava_jax.train_config import check_mesh_fits, config_error, validate_config
from llava_jax.models.config import LlavaConfig, get_preset, jnp_dtype
from llava_jax.models.llava import LlavaModel, abstract_params

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a preempted job


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Loss and train step


def make_train_step(graphdef, tx, *, loss_chunk_size: int, lm_head_target_fraction: float = 0.0):
    """(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

    batch leaves are [accum, rows, ...]; pixel_values/image_mask are absent for text-only
    batches (no dummy images through CLIP). The loss is the mean over all target tokens of
    the step, so it does not depend on how the rows are split into micro-batches or devices.
    """

    def micro_loss(trainable, frozen, micro, num_targets):
        model = nnx.merge(graphdef, optim.merge_params(trainable, frozen))
        hidden = model(micro["input_ids"], micro.get("pixel_values"),
                       segment_ids=micro["segment_ids"], positions=micro["positions"],
                       image_mask=micro.get("image_mask"), return_hidden=True)
        targets = optim.shifted_targets(micro["labels"])
        loss_sum = optim.target_loss_sum(model.language_model.logits, hidden, targets,
                                         chunk_size=loss_chunk_size,
                                         target_fraction=lm_head_target_fraction)
        return loss_sum / num_targets

    grad_fn = jax.value_and_grad(micro_loss)

    def train_step(trainable, frozen, opt_state, batch):
        num_targets = jnp.maximum(
            jnp.sum(optim.shifted_targets(batch["labels"]) != optim.IGNORE_INDEX), 1).astype(jnp.float32)

        def micro_grads(index):  # float32 sums, whatever the param dtype
            micro = jax.tree.map(lambda x: x[index], batch)
            loss, grads = grad_fn(trainable, frozen, micro, num_targets)
            return jax.tree.map(lambda x: x.astype(jnp.float32), (loss, grads))

        # The sum starts from the first micro-batch: no zero-filled gradient buffer, and a
        # one-micro-batch step traces no loop.
        loss, grads = micro_grads(0)
        accum_steps = jax.tree.leaves(batch)[0].shape[0]
        if accum_steps > 1:
            accumulate = lambda i, total: jax.tree.map(jnp.add, total, micro_grads(i))
            loss, grads = jax.lax.fori_loop(1, accum_steps, accumulate, (loss, grads))
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite step changes nothing; the host stops the run when it sees the flag.
        # The new params too: finite gradients times a huge learning rate still overflow.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(new_trainable)))
        keep = lambda new, old: jnp.where(finite, new, old)
        new_trainable = jax.tree.map(keep, new_trainable, trainable)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "target_tokens": num_targets}
        return new_trainable, new_opt_state, metrics

    return train_step


# ----------------------------------------------------------------------------------------------
# Model set-up


def load_tokenizer(c):
    from transformers import PreTrainedTokenizerFast

    directory = c.model.tokenizer_dir or os.path.join(c.model.base_dir, ckpt.TOKENIZER_DIR)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        config_error("model.tokenizer_dir", directory, "holds no tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    vocab = tokenizer.get_vocab()
    # A bare tokenizer.json names no special tokens: take Llama's spellings when present.
    for role, token in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>")):
        if getattr(tokenizer, f"{role}_token") is None and token in vocab:
            setattr(tokenizer, f"{role}_token", token)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # the original LLaVA's choice for v1 templates
    return tokenizer


def resolve_model_config(c, tokenizer) -> LlavaConfig:
    """The architecture (from base_dir or preset + overrides) with the config's compute knobs."""
    knobs = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                 remat_policy=c.model.remat_policy, scan_layers=c.model.scan_layers)
    if c.model.base_dir:
        return ckpt.read_config(c.model.base_dir).replace(**knobs)
    overrides = c.model.overrides.to_dict()
    if c.model.vocab_from_tokenizer:
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_id is None or image_id == tokenizer.unk_token_id:
            config_error("model.vocab_from_tokenizer", True, "the tokenizer has no '<image>' token")
        text = dict(overrides.get("text", {}), vocab_size=len(tokenizer))
        overrides.update(text=text, image_token_index=image_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    try:
        return get_preset(c.model.preset, **overrides, **knobs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model.overrides: {e}") from e


def random_params(model_config: LlavaConfig, seed: int, shardings, *,
                  projector_only: bool = False) -> dict:
    """Random initialisation straight into the sharded layout (no full copy on one device).

    projector_only: just the projector's sub-tree (stage 1 from an LLM + CLIP base).
    """
    from llava_jax.models.projector import Projector

    dtype = jnp_dtype(model_config.param_dtype)
    module = Projector if projector_only else LlavaModel

    def init():
        state = nnx.state(module(model_config, rngs=nnx.Rngs(params=seed)), nnx.Param)
        return jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(state))

    return jax.jit(init, out_shardings=shardings)()


def with_shardings(abstract: dict, shardings: dict) -> dict:
    """ShapeDtypeStructs carrying their target sharding (what orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _projector_specs(model_config: LlavaConfig, projector: dict):
    """Conversion specs of the projector sub-tree (paths relative to it, as `flatten` gives)."""
    from llava_jax.convert import mapping

    shapes = {f"multi_modal_projector/{path}": value.shape
              for path, value in mapping.flatten(projector).items()}
    return [(spec.path.removeprefix("multi_modal_projector/"), spec)
            for spec in mapping.param_specs(model_config, shapes)]


def load_projector(source: str, model_config: LlavaConfig, abstract_proj: dict,
                   shardings: dict) -> dict:
    """The 'multi_modal_projector' sub-tree from a workdir / model dir or an original file."""
    if os.path.isdir(source):
        subset = {"multi_modal_projector": with_shardings(abstract_proj, shardings)}
        return ckpt.load_params(source, subset, partial=True)["multi_modal_projector"]
    from llava_jax.convert import mapping
    from llava_jax.convert.tensors import TensorReader

    reader = TensorReader(source, mapping.canonical_llava_name)
    flat_abstract, flat_shardings = mapping.flatten(abstract_proj), mapping.flatten(shardings)
    out = {}
    for leaf, spec in _projector_specs(model_config, abstract_proj):
        (name,) = spec.torch_names
        if name not in reader:
            raise ValueError(f"config.model.projector={source!r}: no tensor for {name} "
                             f"(has {reader.names()[:6]})")
        value = spec.to_ours(reader.get(name))
        if value.shape != spec.shape:
            raise ValueError(f"config.model.projector: {name} has shape {value.shape}, the "
                             f"model needs {spec.shape}")
        out[leaf] = jax.device_put(value.astype(flat_abstract[leaf].dtype), flat_shardings[leaf])
    return mapping.unflatten(out)


def export_projector(params: dict, model_config: LlavaConfig, directory: str) -> str:
    """Writes the projector as the original stage-1 output: `model.mm_projector.{0,2}.*`."""
    from pathlib import Path

    from llava_jax.convert import mapping
    from llava_jax.convert.tensors import write_safetensors

    projector = params["multi_modal_projector"]
    flat = mapping.flatten(projector)
    tensors = {}
    for leaf, spec in _projector_specs(model_config, projector):
        value = np.asarray(jax.device_get(flat[leaf]), np.float32)
        (name,) = spec.torch_names
        tensors[mapping.original_projector_name(name)] = spec.to_torch(value)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "mm_projector.safetensors")
    write_safetensors(Path(path), tensors)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump({"mm_projector_type": model_config.projector_type,
                   "mm_hidden_size": model_config.projector_input_size,
                   "hidden_size": model_config.text.hidden_size}, handle, indent=2)
    return path


# ----------------------------------------------------------------------------------------------
# The training run


def build_step(c, model_config: LlavaConfig, mesh, total_steps: int) -> dict:
    """Everything the jitted step needs, from shapes only (also used by memory_plan.py).

    Returns graphdef, abstract (all params), abstract_trainable / abstract_frozen, their
    shardings, tx, schedule, abstract_opt, opt_shardings, batch_sharding and train_step.
    """
    out = {}
    out["graphdef"], out["abstract"] = abstract_params(model_config)
    out["shardings"] = sharding.param_shardings(
        out["abstract"], mesh, tuple(c.mesh.param_rules), tuple(c.mesh.logical_axis_rules))
    pattern = optim.stage_trainable_pattern(c.stage, c.trainable)
    out["abstract_trainable"], out["abstract_frozen"] = optim.split_params(out["abstract"], pattern)
    out["trainable_shardings"], out["frozen_shardings"] = optim.split_params(out["shardings"],
                                                                             pattern)
    out["tx"], out["schedule"] = optim.make_optimizer(c.optim, total_steps)
    out["abstract_opt"] = jax.eval_shape(out["tx"].init, out["abstract_trainable"])
    out["opt_shardings"] = sharding.state_shardings(out["abstract_opt"],
                                                    out["trainable_shardings"], mesh)
    # Batch leaves are [accum, rows, ...]: rows split over (data, fsdp).
    out["batch_sharding"] = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    out["train_step"] = jax.jit(
        make_train_step(out["graphdef"], out["tx"], loss_chunk_size=c.loss_chunk_size,
                        lm_head_target_fraction=c.lm_head_target_fraction),
        in_shardings=(out["trainable_shardings"], out["frozen_shardings"], out["opt_shardings"],
                      out["batch_sharding"]),
        out_shardings=(out["trainable_shardings"], out["opt_shardings"],
                       NamedSharding(mesh, P())),
        donate_argnums=(0, 2))
    return out


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
        self.tokenizer = load_tokenizer(c)
        self.model_config = resolve_model_config(c, self.tokenizer)
        self.total_steps = self._total_steps()
        self.__dict__.update(build_step(c, self.model_config, self.mesh, self.total_steps))
        self.trainable = self.frozen = self.opt_state = None
        self.step = 0

    # ----- schedule length -----
    def _total_steps(self) -> int:
        c = self.config
        if c.optim.total_steps > 0:
            return int(c.optim.total_steps)
        from llava_jax.data import num_samples

        if c.data.num_epochs is None:
            config_error("optim.total_steps", -1, "set it when data.num_epochs is None (endless data)")
        samples = num_samples(c.data) * c.data.num_epochs
        if c.data.packing:
            logging.warning("data.packing: rows hold several samples, so the derived schedule "
                            "(samples / global batch) is longer than the data; set "
                            "optim.total_steps for an exact schedule")
        return max(1, math.ceil(samples / c.optim.global_batch_size))

    # ----- state -----
    def _manager(self):
        import orbax.checkpoint as ocp

        ckpt._quiet_orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.checkpoint.max_to_keep, create=True,
            enable_async_checkpointing=self.config.checkpoint.async_save)
        return ocp.CheckpointManager(os.path.join(self.workdir, ckpt.CHECKPOINTS_DIR),
                                     options=options)

    def _fresh_state(self):
        c, mc = self.config, self.model_config
        if c.model.base_dir:
            stored = {name.split("/")[0] for name in ckpt.stored_param_dtypes(c.model.base_dir)}
            wanted = {k: v for k, v in self.abstract.items() if k in stored}
            params = ckpt.load_params(c.model.base_dir, with_shardings(
                wanted, {k: self.shardings[k] for k in wanted}), partial=True)
            missing = set(self.abstract) - set(params)
            if missing - {"multi_modal_projector"}:
                config_error("model.base_dir", c.model.base_dir, f"holds no {sorted(missing)} weights")
            if "multi_modal_projector" in missing or c.model.reinit_projector:
                params["multi_modal_projector"] = random_params(
                    mc, c.seed, self.shardings["multi_modal_projector"], projector_only=True)
                logging.info("projector: random initialisation")
        else:
            params = random_params(mc, c.seed, self.shardings)
        if c.model.projector:
            params["multi_modal_projector"] = load_projector(
                c.model.projector, mc, self.abstract["multi_modal_projector"],
                self.shardings["multi_modal_projector"])
            logging.info("projector: loaded from %s", c.model.projector)
        pattern = optim.stage_trainable_pattern(c.stage, c.trainable)
        self.trainable, self.frozen = optim.split_params(params, pattern)
        self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(self.trainable)
        self.step = 0

    def _save_args(self, iterator):
        import grain
        import orbax.checkpoint as ocp

        meta = {"step": self.step, "total_steps": self.total_steps,
                "config": json.loads(self.config.to_json_best_effort())}
        return ocp.args.Composite(
            params=ocp.args.StandardSave(optim.merge_params(self.trainable, self.frozen)),
            opt_state=ocp.args.StandardSave(self.opt_state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta))

    def _restore(self, manager, step: int, iterator) -> None:
        import grain
        import orbax.checkpoint as ocp

        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_shardings(self.abstract, self.shardings)),
            opt_state=ocp.args.StandardRestore(with_shardings(self.abstract_opt, self.opt_shardings)),
            data=grain.checkpoint.CheckpointRestore(iterator),
            meta=ocp.args.JsonRestore()))
        pattern = optim.stage_trainable_pattern(self.config.stage, self.config.trainable)
        self.trainable, self.frozen = optim.split_params(restored["params"], pattern)
        self.opt_state = restored["opt_state"]
        self.step = int(restored["meta"]["step"])

    def _write_model_files(self) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, ckpt.CONFIG_FILE), "w") as handle:
            json.dump(self.model_config.to_dict(), handle, indent=2)
        self.tokenizer.save_pretrained(os.path.join(self.workdir, ckpt.TOKENIZER_DIR))
        with open(os.path.join(self.workdir, "train_config.json"), "w") as handle:
            handle.write(self.config.to_json_best_effort(indent=2))

    def model(self) -> LlavaModel:
        """The current parameters as a LlavaModel (for evaluation)."""
        return nnx.merge(self.graphdef, optim.merge_params(self.trainable, self.frozen))

    # ----- data -----
    def _dataset(self):
        from llava_jax.data import make_dataset

        c, mc = self.config, self.model_config
        return make_dataset(
            c.data, self.tokenizer, num_image_tokens=mc.num_image_tokens,
            image_token_index=mc.image_token_index, image_size=mc.vision.image_size,
            global_batch_size=c.optim.global_batch_size // c.optim.grad_accum_steps, seed=c.seed,
            shard_index=jax.process_index(), shard_count=jax.process_count(),
            pad_id=self.tokenizer.pad_token_id)

    def _next_batch(self, iterator):
        """grad_accum_steps micro-batches, padded to one length, stacked: host numpy [accum, ...].

        Returns None when the data are exhausted (a partial step is dropped).
        """
        micro = []
        for _ in range(self.config.optim.grad_accum_steps):
            try:
                micro.append(next(iterator))
            except StopIteration:
                return None
        length = max(m["input_ids"].shape[1] for m in micro)
        has_images = any(bool(m["image_mask"].any()) for m in micro)
        if jax.process_count() > 1:  # all processes must build the same global shapes
            from jax.experimental import multihost_utils

            agreed = multihost_utils.process_allgather(np.array([length, has_images], np.int64))
            length, has_images = int(agreed[:, 0].max()), bool(agreed[:, 1].any())
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "labels": optim.IGNORE_INDEX,
                      "segment_ids": 0, "positions": 0}
        batch = {}
        for name, value in pad_values.items():
            batch[name] = np.stack([np.pad(m[name], ((0, 0), (0, length - m[name].shape[1])),
                                           constant_values=value) for m in micro])
        if has_images:
            batch["pixel_values"] = np.stack([m["pixel_values"] for m in micro])
            batch["image_mask"] = np.stack([m["image_mask"] for m in micro])
        return batch

    def _step_flops(self, rows: int, length: int, slots: int, with_images: bool) -> float:
        return metrics_lib.train_step_flops(
            self.model_config, rows, length, slots, with_images=with_images,
            train_projector="multi_modal_projector" in self.abstract_trainable,
            train_llm="language_model" in self.abstract_trainable)

    # ----- loop -----
    def run(self) -> dict:
        c = self.config
        self._write_model_files()
        manager = self._manager()
        iterator = self._dataset()
        latest = manager.latest_step()
        if latest is not None:
            self._restore(manager, latest, iterator)
            logging.info("resumed from %s at step %d", manager.directory, self.step)
        else:
            self._fresh_state()
        stop_at = self.total_steps if c.max_steps < 0 else min(c.max_steps, self.total_steps)
        preempted = {"flag": False}
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
                if preempted["flag"]:
                    stopped = "preempted"
                    break
                started = time.perf_counter()
                host_batch = self._next_batch(iterator)
                if host_batch is None:
                    stopped = "data exhausted"
                    break
                device_batch = sharding.global_batch(host_batch, self.mesh)
                data_wait = time.perf_counter() - started
                self.trainable, self.opt_state, step_metrics = self.train_step(
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
                            values, peak, float(self.schedule(self.step - 1))))
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
        if c.stage == 1 and jax.process_index() == 0:
            export_projector(optim.merge_params(self.trainable, self.frozen), self.model_config,
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
            f": stopping. The update was skipped; the last checkpoint (step {last_saved}) is "
            "intact. Lower optim.learning_rate or check the data.")


def _main_thread() -> bool:  # signal handlers can only be installed there
    import threading

    return threading.current_thread() is threading.main_thread()
