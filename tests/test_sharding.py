"""Mesh construction, logical axis rules, and 8 fake devices == 1 device."""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from llava_jax import sharding

REPO = Path(__file__).resolve().parents[1]


def mesh_config(data=1, fsdp=-1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_mesh_shape_resolution_and_errors():
    assert sharding.resolve_mesh_shape(mesh_config(), 8) == (1, 8, 1)
    assert sharding.resolve_mesh_shape(mesh_config(data=2, tensor=2), 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape(mesh_config(data=-1, fsdp=4), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match=r"mesh\.data=1, mesh\.fsdp=3, mesh\.tensor=1"):
        sharding.resolve_mesh_shape(mesh_config(fsdp=3), 8)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        sharding.resolve_mesh_shape(mesh_config(tensor=3), 8)
    with pytest.raises(ValueError, match="At most one"):
        sharding.resolve_mesh_shape(mesh_config(data=-1), 8)
    with pytest.raises(ValueError, match=r"mesh\.tensor=0"):
        sharding.resolve_mesh_shape(mesh_config(tensor=0), 8)


def test_partition_specs_follow_the_rules():
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    spec = lambda path, shape: sharding.partition_spec(path, shape, mesh)
    # 7B-like shapes with the stacked [layers] axis first.
    assert spec("language_model/layers/self_attn/q_proj/kernel", (32, 4096, 4096)) == \
        P(None, "fsdp", "tensor")
    assert spec("language_model/layers/self_attn/o_proj/kernel", (32, 4096, 4096)) == \
        P(None, "tensor", "fsdp")
    assert spec("language_model/layers/mlp/down_proj/kernel", (32, 11008, 4096)) == \
        P(None, "tensor", "fsdp")
    assert spec("language_model/embed_tokens/embedding", (32064, 4096)) == P("tensor", "fsdp")
    assert spec("language_model/lm_head/kernel", (4096, 32064)) == P("fsdp", "tensor")
    assert spec("language_model/layers/input_layernorm/scale", (32, 4096)) == P(None, None)
    assert spec("vision_tower/layers/fc1/kernel", (24, 1024, 4096)) == P(None, "fsdp", "tensor")
    assert spec("vision_tower/patch_embedding", (14, 14, 3, 1024)) == P(None, None, None, "fsdp")
    assert spec("multi_modal_projector/linear_1/kernel", (1024, 4096)) == P("fsdp", "tensor")
    # Column then row parallel (the reverse for linear_2 sidesteps an XLA partitioner bug).
    assert spec("multi_modal_projector/linear_2/kernel", (4096, 4096)) == P("tensor", "fsdp")
    assert spec("multi_modal_projector/linear_3/kernel", (4096, 4096)) == P("fsdp", "tensor")
    assert spec("multi_modal_projector/linear_10/kernel", (4096, 4096)) == P("tensor", "fsdp")
    # A dim the mesh axis does not divide stays replicated rather than failing.
    assert spec("language_model/embed_tokens/embedding", (32001, 4096)) == P(None, "fsdp")


def test_optimizer_state_takes_parameter_shardings():
    import jax
    import optax

    mesh = sharding.make_mesh(mesh_config(), jax.devices()[:1])
    params = {"a": {"kernel": jax.ShapeDtypeStruct((4, 8), "float32")},
              "b": {"scale": jax.ShapeDtypeStruct((8,), "float32")}}
    shardings = sharding.param_shardings(params, mesh)
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    state_shardings = sharding.state_shardings(state, shardings, mesh)
    adam = state_shardings[0]
    assert adam.mu["a"]["kernel"] == shardings["a"]["kernel"]
    assert adam.nu["b"]["scale"] == shardings["b"]["scale"]
    assert adam.count.spec == P()


EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    sys.path.insert(0, "tests")
    from test_train import tiny_config, flat
    from llava_jax import sharding
    from llava_jax.training import optim
    from llava_jax.training.trainer import Trainer
    assert jax.device_count() == 8, jax.devices()
    data = json.loads(sys.argv[1])
    out = {}
    for name, devices, mesh in (("one", jax.devices()[:1], dict(data=1, fsdp=1, tensor=1)),
                                ("eight", jax.devices(), dict(data=2, fsdp=2, tensor=2))):
        config = tiny_config(data, total_steps=3)
        config.optim.global_batch_size = 8
        config.optim.grad_accum_steps = 2
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
        trainer = Trainer(config, sys.argv[2] + "/" + name,
                          mesh=sharding.make_mesh(config.mesh, devices))
        result = trainer.run()
        params = flat(optim.merge_params(trainer.trainable, trainer.frozen))
        kernel = trainer.trainable["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
        out[name] = {"history": result["history"],
                     "params": {k: v.astype(float).ravel()[:64].tolist() for k, v in params.items()},
                     "spec": str(kernel.sharding.spec)}
    print("RESULT" + json.dumps(out))
""")


def _demo_data_and_eight_devices(tmp_path):
    """The first 40 stage-2 demo records (paths for the subprocess) and its 8-device env."""
    from llava_jax.data import demo

    prepared = demo.prepare()
    records = json.load(open(prepared["stage2_json"]))[:40]
    data_json = tmp_path / "stage2.json"
    data_json.write_text(json.dumps(records))
    data = {"stage2_json": str(data_json), "image_root": prepared["image_root"],
            "tokenizer_dir": prepared["tokenizer_dir"]}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    return data, env


def test_eight_fake_devices_match_one(tmp_path):
    data, env = _demo_data_and_eight_devices(tmp_path)
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, json.dumps(data), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    one, eight = result["one"], result["eight"]
    assert eight["spec"] == str(P(None, "fsdp", "tensor"))  # really sharded
    assert [s for s, _ in one["history"]] == [s for s, _ in eight["history"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(one["history"], eight["history"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["history"], eight["history"])
    for name, values in one["params"].items():
        assert max(abs(x - y) for x, y in zip(values, eight["params"][name])) < 1e-4, name


# Every parameter's gradient on 8 fake devices against 1 device. Losses (and Adam-normalised
# updates) hide a wrong gradient: an XLA SPMD partitioner bug once gave linear_1 of the
# projector (and everything below it) gradients 10-100% off on data=2 fsdp=2 tensor=2 with the
# loss exact (see the projector rules in sharding.DEFAULT_PARAM_RULES). The gradients come out
# of the production train step through an "optimizer" that stores them as its state and
# changes nothing.
ALL_GRADIENTS = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import optax
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    sys.path.insert(0, "tests")
    from test_train import tiny_config, flat
    from llava_jax import sharding
    from llava_jax.training import state
    from llava_jax.training.step import make_train_step
    from llava_jax.training.trainer import Trainer
    assert jax.device_count() == 8, jax.devices()
    data, workdir, meshes = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    keep = optax.GradientTransformation(  # state := the gradients; parameters unchanged
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, opt_state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))

    def gradients(shape, devices, batches, params):
        config = tiny_config(data, total_steps=1)
        config.trainable = ".*"  # the vision tower too: a wrong gradient anywhere shows
        config.optim.global_batch_size = 8  # one micro-batch: 8 rows, 1-2 per device
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        mesh = sharding.make_mesh(config.mesh, devices)
        trainer = Trainer(config, f"{workdir}/{'x'.join(map(str, shape))}", mesh=mesh)
        s = trainer.setup
        if params is None:  # random, once; the same values on every mesh
            params = state.initial_params(config, trainer.model_config, s)
            params = jax.tree.map(np.asarray, params)
        trainable, frozen = s.split(jax.device_put(params, s.shardings))
        step = jax.jit(make_train_step(s.graphdef, keep, loss_chunk_size=config.loss_chunk_size,
                                       lm_head_target_fraction=config.lm_head_target_fraction),
                       in_shardings=(s.trainable_shardings, s.frozen_shardings,
                                     s.trainable_shardings, s.batch_sharding),
                       out_shardings=(s.trainable_shardings, s.trainable_shardings, None))
        if batches is None:
            batch = trainer._next_batch(trainer._dataset())
            assert not batch["image_mask"].all() and batch["image_mask"].any(-1).all(), \\
                batch["image_mask"]  # rows with images and empty slots
            # Rows in another order, each row's images spread over its slots (empty slots before
            # and between real ones, real ones in order): the loss and gradients must not change.
            rows = batch["input_ids"].shape[1]
            rng = np.random.RandomState(0)
            order = rng.permutation(rows)
            shuffled = {k: v[:, order] for k, v in batch.items()}
            pixels, mask = shuffled["pixel_values"], shuffled["image_mask"]
            spread_pixels, spread_mask = np.zeros_like(pixels), np.zeros_like(mask)
            for index in np.ndindex(mask.shape[:2]):  # real images keep their order
                real = np.flatnonzero(mask[index])
                slots = np.sort(rng.choice(mask.shape[-1], len(real), replace=False))
                spread_pixels[index][slots], spread_mask[index][slots] = pixels[index][real], True
            assert (spread_mask.sum(-1) == mask.sum(-1)).all() and (spread_mask != mask).any()
            shuffled["pixel_values"], shuffled["image_mask"] = spread_pixels, spread_mask
            batches = [batch, shuffled]
        out = []
        for batch in batches:
            with jax.set_mesh(mesh):
                _, grads, metrics = step(trainable, frozen, trainable,
                                         sharding.global_batch(batch, mesh))
            out.append((float(metrics["loss"]), flat(grads)))
        return out, batches, params

    (one, one_shuffled), batches, params = gradients((1, 1, 1), jax.devices()[:1], None, None)

    def error(a, b):  # worst parameter, each against its own scale (floored: some are ~0)
        floor = 1e-3 * max(np.abs(g).max() for g in a[1].values())
        per = {k: float(np.abs(a[1][k] - b[1][k]).max() / max(np.abs(a[1][k]).max(), floor))
               for k in a[1]}
        name = max(per, key=per.get)
        return {"loss": abs(a[0] - b[0]), "worst": name, "error": per[name], "params": len(per),
                "max_grad": float(max(np.abs(g).max() for g in b[1].values()))}

    result = {"shuffled_one_device": error(one, one_shuffled)}
    for shape in meshes:
        got = gradients(tuple(shape), jax.devices(), batches, params)[0]
        result[str(tuple(shape))] = [error(one, got[0]), error(one_shuffled, got[1])]
    print("RESULT" + json.dumps(result))
""")

ALL_GRADIENT_MESHES = ((2, 2, 2), (1, 4, 2), (2, 1, 4), (2, 4, 1))


def test_eight_fake_devices_give_every_gradient_of_one(tmp_path):
    data, env = _demo_data_and_eight_devices(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", ALL_GRADIENTS, json.dumps(data), str(tmp_path),
         json.dumps(ALL_GRADIENT_MESHES)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    shuffled = result.pop("shuffled_one_device")
    assert shuffled["loss"] < 1e-5 and shuffled["error"] < 1e-4, shuffled
    assert sorted(result) == sorted(str(tuple(m)) for m in ALL_GRADIENT_MESHES)
    for mesh, errors in result.items():
        for e in errors:
            assert e["params"] > 30 and e["max_grad"] > 0, (mesh, e)  # vision tower included
            # float32 sums in another order: ~1e-6; the partitioner bug: > 1e-1.
            assert e["loss"] < 1e-5 and e["error"] < 1e-4, (mesh, e)
