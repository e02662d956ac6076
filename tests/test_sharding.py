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


def test_eight_fake_devices_match_one(tmp_path):
    from llava_jax.data import demo

    prepared = demo.prepare()
    records = json.load(open(prepared["stage2_json"]))[:40]
    data_json = tmp_path / "stage2.json"
    data_json.write_text(json.dumps(records))
    data = {"stage2_json": str(data_json), "image_root": prepared["image_root"],
            "tokenizer_dir": prepared["tokenizer_dir"]}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
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
