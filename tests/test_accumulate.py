"""Gradient accumulation inside the backward (models/accumulate.py) against the plain path.

The train step with several micro-batches and full remat adds each layer's weight gradient
into the running sum inside the backward; `make_train_step(..., accumulate_in_backward=False)`
is the plain `sum += jax.grad(...)`. Both must give the same gradients (float32, 1e-6
relative) on 8 fake devices (fsdp 8; fsdp 4 x tensor 2), scanned and unrolled layers, with and
without accumulation, full training and LoRA with dropout (its masks must be the same in the
recomputed layers); and the in-backward path must hold one float32 gradient tree less.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

COMPARE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import optax
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from llava_jax import sharding, tree
    from llava_jax.models import accumulate
    from llava_jax.models.config import get_preset
    from llava_jax.training import config as train_config, state
    from llava_jax.training.step import make_train_step
    assert jax.device_count() == 8, jax.devices()
    VISION = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
              "image_size": 16, "patch_size": 8}
    TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 3, "num_heads": 4,
            "num_kv_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
    # An "optimizer" whose state is the gradients (and the step count LoRA dropout reads).
    keep = optax.GradientTransformation(
        lambda params: (optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)),
                        jax.tree.map(jnp.zeros_like, params)),
        lambda grads, opt_state, params=None: (jax.tree.map(jnp.zeros_like, grads),
                                               (opt_state[0], grads)))
    claims = []
    plain_stacked = accumulate.stacked_with_sinks
    def counting(*args, **kwargs):  # the in-backward path was taken (and for how many leaves)
        claims.append(sum(s is not None for s in args[4]))
        return plain_stacked(*args, **kwargs)
    accumulate.stacked_with_sinks = counting

    def batch(accum, rows, length, model_config, seed):
        rng = np.random.RandomState(seed)
        image_tokens = model_config.num_image_tokens
        ids = rng.randint(0, 500, (accum, rows, length)).astype(np.int32)
        ids[..., 2:2 + image_tokens] = model_config.image_token_index
        labels = np.where(rng.rand(accum, rows, length) < 0.6, ids, -100).astype(np.int32)
        labels[..., :2 + image_tokens] = -100
        size = model_config.vision.image_size
        return {"input_ids": ids, "labels": labels,
                "segment_ids": np.ones((accum, rows, length), np.int32),
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                             (accum, rows, length)).copy(),
                "pixel_values": rng.rand(accum, rows, 1, size, size, 3).astype(np.float32),
                "image_mask": np.ones((accum, rows, 1), bool)}

    def gradients(case, in_backward):
        c = train_config.default_config(2)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, *case["mesh"]
        c.lora.rank = case["lora"]
        c.lora.dropout = 0.3 if case["lora"] else 0.0
        model_config = get_preset("tiny", vision=VISION, text=TEXT).replace(
            dtype="float32", param_dtype="float32", remat_policy=case["remat"],
            scan_layers=case["scan"])
        mesh = sharding.make_mesh(c.mesh, jax.devices())
        setup = state.build_setup(c, model_config, mesh, total_steps=1)
        params = state.initial_params(c, model_config, setup)
        trainable, frozen = setup.split(params)
        # Random values everywhere (LoRA's B starts at zero, which would hide A's gradient).
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        trainable = jax.tree.unflatten(treedef, [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
        trainable = jax.device_put(trainable, setup.trainable_shardings)
        step = jax.jit(make_train_step(
            setup.graphdef, keep, loss_chunk_size=c.loss_chunk_size,
            activation_rules=tuple(c.mesh.activation_rules),
            dropout_seed=0 if case["lora"] else None, accumulate_in_backward=in_backward),
            in_shardings=(setup.trainable_shardings, setup.frozen_shardings, None,
                          setup.batch_sharding),
            out_shardings=(setup.trainable_shardings, (None, setup.trainable_shardings), None))
        data = batch(case["accum"], 8, 40, model_config, seed=1)
        with jax.set_mesh(mesh):
            _, (_, grads), metrics = step(trainable, frozen, keep.init(trainable),
                                          sharding.global_batch(data, mesh))
        return float(metrics["loss"]), {k: np.asarray(v) for k, v in tree.flatten(grads).items()}

    case = json.loads(sys.argv[1])
    loss, got = gradients(case, True)
    taken = list(claims)
    plain_loss, want = gradients(case, False)
    worst = {k: float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-30))
             for k in want}
    name = max(worst, key=worst.get)
    print("RESULT" + json.dumps({
        "claims": taken, "loss": [loss, plain_loss], "worst": name, "error": worst[name],
        "leaves": sorted(want), "layer_grad_max": float(max(
            np.abs(v).max() for k, v in want.items() if "language_model/layers/" in k))}))
""")

CASES = {
    # (fsdp, tensor), scanned layers, micro-batches, LoRA rank (with dropout), remat policy
    "fsdp8-scan-accum2": {"mesh": [8, 1], "scan": True, "accum": 2, "lora": 0, "remat": "full"},
    "fsdp4x2-unrolled-accum3": {"mesh": [4, 2], "scan": False, "accum": 3, "lora": 0,
                                "remat": "full"},
    "fsdp4x2-scan-lora-accum2": {"mesh": [4, 2], "scan": True, "accum": 2, "lora": 4,
                                 "remat": "full"},
    "fsdp8-unrolled-lora-accum2": {"mesh": [8, 1], "scan": False, "accum": 2, "lora": 4,
                                   "remat": "full"},
    # Not taken: one micro-batch (no sum); a lighter remat policy (keeps its activations).
    "fsdp8-scan-accum1": {"mesh": [8, 1], "scan": True, "accum": 1, "lora": 0, "remat": "full"},
    "fsdp4x2-scan-dots-accum2": {"mesh": [4, 2], "scan": True, "accum": 2, "lora": 0,
                                 "remat": "dots_saveable"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_in_backward_accumulation_gives_the_plain_gradients(name):
    case = CASES[name]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", COMPARE, json.dumps(case)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.split("RESULT", 1)[1])
    in_backward = case["accum"] > 1 and case["remat"] == "full"
    # Taken exactly where it applies, for the decoder's trainable leaves: all 9 of a layer's,
    # or LoRA's 14 adapters (a and b of q/k/v/o/gate/up/down); CLIP is frozen.
    assert r["claims"] == ([14 if case["lora"] else 9] if in_backward else []), r
    if case["lora"]:
        assert all("lora_" in k for k in r["leaves"] if "language_model/layers/" in k), r
    assert r["layer_grad_max"] > 1e-4, r  # the layers' gradients are not all zero
    assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6 * abs(r["loss"][1]), r
    assert r["error"] <= 1e-6, r


def test_in_backward_accumulation_holds_one_gradient_tree_less():
    """Wide layers, few tokens: the micro-batch's layer gradients dominate the temporaries."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from llava_jax.models.config import get_preset
    from llava_jax.models.llava import create_model
    from llava_jax.training import optim
    from llava_jax.training.step import make_train_step

    config = get_preset("tiny", text={"hidden_size": 256, "intermediate_size": 1024,
                                      "num_layers": 8, "num_heads": 4, "num_kv_heads": 2,
                                      "vocab_size": 512, "max_position_embeddings": 64}
                        ).replace(dtype="float32", remat_policy="full")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(config)))
    params = nnx.to_pure_dict(abstract)
    trainable, frozen = optim.split_params(params, optim.STAGE_TRAINABLE[2])
    tx = optax.sgd(1e-3)
    length = 8
    batch = {k: jax.ShapeDtypeStruct((2, 1, length), jnp.int32)
             for k in ("input_ids", "labels", "segment_ids", "positions")}
    layer_bytes = sum(x.size * 4 for x in jax.tree.leaves(trainable["language_model"]["layers"]))
    temporaries = {}
    for in_backward in (True, False):
        step = jax.jit(make_train_step(graphdef, tx, loss_chunk_size=8,
                                       accumulate_in_backward=in_backward))
        compiled = step.lower(trainable, frozen, jax.eval_shape(tx.init, trainable),
                              batch).compile()
        temporaries[in_backward] = compiled.memory_analysis().temp_size_in_bytes
    assert layer_bytes > 20 * 2**20
    # The plain path holds the micro-batch's [layers, ...] gradients beside the sum; the
    # in-backward one a layer's at a time (1/8 of them here; measured: 73 % saved, the rest
    # being about two layers' gradient slices in flight).
    assert temporaries[False] >= layer_bytes, (temporaries, layer_bytes)
    saved = temporaries[False] - temporaries[True]
    assert saved >= (1 - 3 / 8) * layer_bytes, (temporaries, layer_bytes)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("passes", [1, 2])
def test_run_stacked_adds_into_the_sums(scan, passes):
    """d loss / d sums = sums + d loss / d weights; a second pass over the same layers in one
    loss takes the plain path (claiming twice would count the sum twice)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.models import accumulate
    from llava_jax.models.layers import Dense, run_stacked, stacked

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.dense = Dense(8, 8, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=rngs)

        def __call__(self, h):
            return jnp.tanh(self.dense(h))

    graphdef, params = nnx.split(stacked(Layer, 3, nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    scale = jax.random.normal(jax.random.key(2), (8,))  # closed over: a float input

    def loss(p):
        layers = nnx.merge(graphdef, p)
        h = x
        for _ in range(passes):
            h, _ = run_stacked(layers, h, lambda layer, c, _: (layer(c) * scale, None),
                               scan=scan, policy_name="full")
        return jnp.sum(h ** 2)

    def sinking(p, sums, registry):
        registry.register(p, sums)
        with accumulate.sinks(registry):
            return loss(p)

    want = jax.grad(loss)(params)
    leaves = jax.tree.leaves(params)
    sums = jax.tree.unflatten(jax.tree.structure(params), [
        jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate(leaves)])
    registry = accumulate.Sinks()
    grads, sunk = jax.grad(sinking, argnums=(0, 1))(params, sums, registry)
    assert registry.claimed == [True] * len(leaves)
    for got_w, got_s, s, w in zip(*map(jax.tree.leaves, (grads, sunk, sums, want))):
        assert jnp.abs(got_s - s - (w if passes == 1 else w - got_w)).max() <= 1e-5
        assert jnp.allclose(got_s + got_w, s + w, rtol=1e-6, atol=1e-6)
    if passes == 1:  # every weight gradient went into the sums
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
