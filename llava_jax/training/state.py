"""Training set-up: tokenizer, model config, the jitted step's shapes and shardings, first params.

    tokenizer = load_tokenizer(config)
    model_config = resolve_model_config(config, tokenizer)
    setup = build_setup(config, model_config, mesh, total_steps)   # shapes only, no memory
    trainable, frozen = setup.split(initial_params(config, model_config, setup))
    opt_state = setup.init_optimizer(trainable)

State is three nested dicts of jax.Arrays: the `trainable` and `frozen` parameters (split by a
regex on the parameter path, see optim.py) and the optax state of the trainable ones.
`build_setup` needs no parameter memory, so `memory_plan` and the benchmarks use it too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable

import jax
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import checkpoint as ckpt
from llava_jax import sharding
from llava_jax.convert.projector import read_projector
from llava_jax.data import IMAGE_TOKEN, demo, easy_vqa, num_samples
from llava_jax.data import load_tokenizer as load_tokenizer_dir
from llava_jax.data.processor import ProcessorError, read_preprocessor_config
from llava_jax import tree
from llava_jax.models import lora
from llava_jax.models.config import LlavaConfig, get_preset, jnp_dtype
from llava_jax.models.llava import LlavaModel, abstract_params
from llava_jax.models.projector import Projector
from llava_jax.training import optim
from llava_jax.training.config import config_error, lora_settings
from llava_jax.training.step import make_train_step

PROJECTOR = "multi_modal_projector"


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the jitted step needs, from shapes only.

    Parameter trees are nested dicts mirroring the module tree; `abstract*` hold
    ShapeDtypeStructs (param_dtype), `*shardings` the NamedSharding of each leaf.
    """

    graphdef: nnx.GraphDef  # the LlavaModel's structure: nnx.merge(graphdef, params) -> model
    trainable_pattern: str  # regex on flat parameter paths that train
    abstract: dict  # every parameter
    shardings: dict
    abstract_trainable: dict  # the trainable / frozen halves of `abstract`
    abstract_frozen: dict
    trainable_shardings: dict
    frozen_shardings: dict
    tx: optax.GradientTransformation  # clip + AdamW over the trainable half only
    schedule: optax.Schedule  # learning rate by step
    abstract_opt: Any  # optax state of the trainable half
    opt_shardings: Any
    batch_sharding: NamedSharding  # batch leaves [accum, rows, ...]: rows over (data, fsdp)
    # jitted (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics); donates
    # the trainable params and the optimizer state.
    train_step: Callable
    lora: lora.LoraConfig | None = None  # a LoRA run's adapters (config.lora), else None

    def split(self, params: dict) -> tuple[dict, dict]:
        """All parameters -> (trainable, frozen)."""
        return optim.split_params(params, self.trainable_pattern)

    def init_optimizer(self, trainable: dict):
        """Fresh optimizer state, created directly in its sharded layout."""
        return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(trainable)

    def model(self, trainable: dict, frozen: dict) -> LlavaModel:
        return nnx.merge(self.graphdef, optim.merge_params(trainable, frozen))

    @property
    def trains_projector(self) -> bool:
        return PROJECTOR in self.abstract_trainable

    @property
    def trains_llm(self) -> bool:
        return "language_model" in self.abstract_trainable


def build_setup(c, model_config: LlavaConfig, mesh, total_steps: int) -> TrainSetup:
    """The step's shapes, shardings, optimizer and jitted function for config `c`.

    A LoRA run (config.lora.rank > 0) trains the adapters and the projector; its frozen
    leaves are held in the compute dtype (model.dtype): the base never updates, so float32
    master copies would only double its memory.
    """
    adapters = run_adapters(c)
    if adapters is None:
        graphdef, abstract = abstract_params(model_config)
    else:
        graphdef, abstract = lora.abstract_lora_params(model_config, adapters)
    pattern = optim.stage_trainable_pattern(c.stage, c.trainable, lora=adapters is not None)
    abstract_trainable, abstract_frozen = optim.split_params(abstract, pattern)
    if adapters is not None:
        compute = jnp_dtype(model_config.dtype)
        abstract_frozen = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, compute)
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, abstract_frozen)
        abstract_frozen = _keep_scales_float32(abstract_frozen)
        abstract = optim.merge_params(abstract_trainable, abstract_frozen)
    shardings = sharding.param_shardings(
        abstract, mesh, tuple(c.mesh.param_rules), tuple(c.mesh.logical_axis_rules))
    trainable_shardings, frozen_shardings = optim.split_params(shardings, pattern)
    projector_lr = None
    if adapters is not None and c.lora.projector_learning_rate > 0:
        projector_lr = float(c.lora.projector_learning_rate)
    tx, schedule = optim.make_optimizer(c.optim, total_steps,
                                        projector_learning_rate=projector_lr)
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    opt_shardings = sharding.state_shardings(abstract_opt, trainable_shardings, mesh)
    batch_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    activation_rules = tuple(c.mesh.activation_rules)
    sharding.check_activation_rules(activation_rules)
    train_step = jax.jit(
        make_train_step(graphdef, tx, loss_chunk_size=c.loss_chunk_size,
                        lm_head_target_fraction=c.lm_head_target_fraction,
                        activation_rules=activation_rules,
                        dropout_seed=c.seed if adapters is not None and adapters.dropout > 0
                        else None),
        in_shardings=(trainable_shardings, frozen_shardings, opt_shardings, batch_sharding),
        out_shardings=(trainable_shardings, opt_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0, 2))
    return TrainSetup(
        graphdef=graphdef, trainable_pattern=pattern, abstract=abstract, shardings=shardings,
        abstract_trainable=abstract_trainable, abstract_frozen=abstract_frozen,
        trainable_shardings=trainable_shardings, frozen_shardings=frozen_shardings, tx=tx,
        schedule=schedule, abstract_opt=abstract_opt, opt_shardings=opt_shardings,
        batch_sharding=batch_sharding, train_step=train_step, lora=adapters)


def run_adapters(c) -> lora.LoraConfig | None:
    """The run's adapters: config.lora, or, when model.base_dir is a LoRA model directory (an
    imported PEFT adapter, an earlier LoRA run), the adapters stored there (rank, alpha,
    targets, quantization; dropout stays config.lora's), which the run continues."""
    adapters = lora_settings(c)
    if adapters is None or not c.model.base_dir:
        return adapters
    stored = ckpt.read_lora_config(c.model.base_dir)
    if stored is None:
        return adapters
    continued = dataclasses.replace(stored, dropout=adapters.dropout)
    if continued != adapters:
        logging.warning("LoRA: continuing the adapters of %s (%s), not config.lora's (%s)",
                        c.model.base_dir, continued.to_dict(), adapters.to_dict())
    return continued


def _keep_scales_float32(abstract: dict) -> dict:
    """Quantization scales stay float32 (a bf16 scale would add ~0.4 % error per weight)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.ShapeDtypeStruct(x.shape, jax.numpy.float32)
        if tree.flat_path(kp).endswith("/kernel_scale") else x, abstract)


# ----------------------------------------------------------------------------------------------
# What the config names: data, tokenizer, architecture, schedule length


def prepare_builtin_data(c) -> None:
    """Generates the built-in data the config points at (`data.builtin`), once, on first use."""
    if c.data.builtin == "demo":
        demo.prepare()
    elif c.data.builtin == "demo_multiround":
        demo.prepare_multiround()
    elif c.data.builtin == "easy_vqa":
        easy_vqa.prepare()


def load_tokenizer(c):
    """The run's tokenizer: `model.tokenizer_dir`, else the base model directory's."""
    directory = c.model.tokenizer_dir or os.path.join(c.model.base_dir, ckpt.TOKENIZER_DIR)
    try:
        return load_tokenizer_dir(directory)
    except FileNotFoundError:
        config_error("model.tokenizer_dir", directory, "holds no tokenizer.json")


def base_preprocessor_config(c) -> dict | None:
    """The preprocessor_config.json beside the run's tokenizer (`model.tokenizer_dir`, else
    the base model's tokenizer/, where conversion puts it): what the model's processor does
    to images. None when there is none (then the model config's defaults apply)."""
    directory = c.model.tokenizer_dir or os.path.join(c.model.base_dir, ckpt.TOKENIZER_DIR)
    try:
        return read_preprocessor_config(directory)
    except ProcessorError as error:
        config_error("model.tokenizer_dir", directory, str(error))


def resolve_model_config(c, tokenizer) -> LlavaConfig:
    """The architecture (from base_dir or preset + overrides) with the config's compute knobs."""
    knobs = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                 remat_policy=c.model.remat_policy, scan_layers=c.model.scan_layers,
                 attention=c.model.attention)
    if c.model.base_dir:
        return ckpt.read_config(c.model.base_dir).replace(**knobs)
    overrides = c.model.overrides.to_dict()
    if c.model.vocab_from_tokenizer:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id is None or image_id == tokenizer.unk_token_id:
            config_error("model.vocab_from_tokenizer", True,
                         f"the tokenizer has no {IMAGE_TOKEN!r} token")
        text = dict(overrides.get("text", {}), vocab_size=len(tokenizer))
        overrides.update(text=text, image_token_index=image_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    try:
        return get_preset(c.model.preset, **overrides, **knobs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model.overrides: {e}") from e


def total_steps(c) -> int:
    """The schedule's length: optim.total_steps, else ceil(samples x epochs / global batch)."""
    if c.optim.total_steps > 0:
        return int(c.optim.total_steps)
    if c.data.num_epochs is None:
        config_error("optim.total_steps", -1, "set it when data.num_epochs is None (endless data)")
    samples = num_samples(c.data) * c.data.num_epochs
    if c.data.packing:
        logging.warning("data.packing: rows hold several samples, so the derived schedule "
                        "(samples / global batch) is longer than the data; set "
                        "optim.total_steps for an exact schedule")
    return max(1, math.ceil(samples / c.optim.global_batch_size))


# ----------------------------------------------------------------------------------------------
# First parameters


def random_params(model_config: LlavaConfig, seed: int, shardings, *,
                  projector_only: bool = False) -> dict:
    """Random initialisation straight into the sharded layout (no full copy on one device).

    projector_only: just the projector's sub-tree (stage 1 from an LLM + CLIP base).
    """
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


def load_projector(source: str, model_config: LlavaConfig, abstract_projector: dict,
                   shardings: dict) -> dict:
    """The projector sub-tree from a workdir / model directory or an original mm_projector file."""
    if os.path.isdir(source):
        subset = {PROJECTOR: with_shardings(abstract_projector, shardings)}
        return ckpt.load_params(source, subset, partial=True)[PROJECTOR]
    return read_projector(source, model_config, abstract_projector, shardings)


def initial_params(c, model_config: LlavaConfig, setup: TrainSetup) -> dict:
    """The parameters a fresh run starts from, sharded: the base model directory's (a random
    projector where it has none, or when `model.reinit_projector`), or a random model; then
    `model.projector` replaces the projector when set. A LoRA run adds fresh adapters (and
    quantizes their base kernels), or continues from a LoRA model directory's."""
    if setup.lora is not None:
        return _lora_initial_params(c, model_config, setup)
    return _base_params(c, model_config, setup.abstract, setup.shardings)


def _base_params(c, model_config: LlavaConfig, abstract: dict, shardings: dict) -> dict:
    """`initial_params` of the plain model, into `abstract`'s dtypes and `shardings`."""
    if c.model.base_dir:
        stored = {name.split("/")[0] for name in ckpt.stored_param_dtypes(c.model.base_dir)}
        wanted = {k: v for k, v in abstract.items() if k in stored}
        params = ckpt.load_params(c.model.base_dir, with_shardings(
            wanted, {k: shardings[k] for k in wanted}), partial=True)
        missing = set(abstract) - set(params)
        if missing - {PROJECTOR}:
            config_error("model.base_dir", c.model.base_dir, f"holds no {sorted(missing)} weights")
        if PROJECTOR in missing or c.model.reinit_projector:
            params[PROJECTOR] = random_params(model_config, c.seed, shardings[PROJECTOR],
                                              projector_only=True)
            logging.info("projector: random initialisation")
    else:
        params = random_params(model_config, c.seed, shardings)
    if c.model.projector:
        params[PROJECTOR] = load_projector(c.model.projector, model_config,
                                           abstract[PROJECTOR], shardings[PROJECTOR])
        logging.info("projector: loaded from %s", c.model.projector)
    return params


def _lora_initial_params(c, model_config: LlavaConfig, setup: TrainSetup) -> dict:
    adapters = setup.lora
    if c.model.base_dir:
        if ckpt.read_lora_config(c.model.base_dir) is not None:  # continue its adapters
            params = ckpt.load_params(c.model.base_dir,
                                      with_shardings(setup.abstract, setup.shardings))
            if c.model.projector:
                params[PROJECTOR] = load_projector(c.model.projector, model_config,
                                                   setup.abstract[PROJECTOR],
                                                   setup.shardings[PROJECTOR])
            logging.info("LoRA: adapters loaded from %s", c.model.base_dir)
            return params
    # The plain model's leaves in the dtypes the LoRA run keeps them in.
    mesh = jax.tree.leaves(setup.shardings)[0].mesh
    plain_graphdef, plain_abstract = abstract_params(model_config)
    dtypes = {path: leaf.dtype for path, leaf in tree.flatten(setup.abstract).items()}
    compute = jnp_dtype(model_config.dtype)  # a kernel quantized in the LoRA tree
    plain_abstract = tree.unflatten({
        path: jax.ShapeDtypeStruct(leaf.shape, dtypes.get(path, compute))
        for path, leaf in tree.flatten(plain_abstract).items()})
    plain_shardings = sharding.param_shardings(
        plain_abstract, mesh, tuple(c.mesh.param_rules), tuple(c.mesh.logical_axis_rules))
    base = _base_params(c, model_config, plain_abstract, plain_shardings)
    param_dtype = jnp_dtype(model_config.param_dtype)

    def attach(base):
        base = jax.tree.map(lambda x, a: x.astype(a.dtype), base, plain_abstract)
        model = nnx.merge(plain_graphdef, base)
        lora.apply_lora(model, adapters, seed=c.seed, adapter_dtype=param_dtype)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, setup.abstract)

    with warnings.catch_warnings():  # quantized kernels change dtype: their buffers cannot be reused
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        params = jax.jit(attach, out_shardings=setup.shardings, donate_argnums=0)(base)
    logging.info("LoRA: rank %d adapters on %d modules, base %s", adapters.rank,
                 len(lora.adapted_modules(params)), adapters.base_quantization)
    return params
