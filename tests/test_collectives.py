"""Collective volume of the compiled 8-device train step against what FSDP / tensor parallelism
should move, and the HLO reader (llava_jax.training.hlo_stats) on hand-written HLO.

The step is compiled (never run) for 8 fake CPU devices in a subprocess: the tiny LLaVA,
stage 2 (projector + LLM train, vision tower frozen), float32 compute (XLA:CPU emulates bf16
dots in f32 and then gathers some weights once more than the TPU compiler does), remat
'full', scanned layers, 24 rows x 64 tokens, one image per row. Bytes are per device per step,
counted on each collective's result (hlo_stats' docstring).

Expected volumes, from the parameter shardings. G = bytes one all-gather over fsdp returns
for every fsdp-sharded leaf (its shard bytes x fsdp); R = per-device bytes of the leaves not
sharded over fsdp (norm scales, biases):

  all-gather (FSDP weights). Every weight that enters a matmul is gathered for the forward;
    decoder layers (and the LM head) again for the backward, where remat recomputes the
    forward and the transposed matmul dx = dy W^T reuses that gather. The frozen vision tower
    is forward only, its last layer is never computed (LLaVA reads layer -2) and the
    embedding lookup may move rows with an all-to-all instead. Hence
        2 G_decoder_layers  <=  all-gather  <=  2 (G_trainable + G_frozen).
    No all-gather returns a whole-batch activation (all rows and all positions / image
    tokens): the residual stream stays split over (data, fsdp).
  gradient reduction. Each trainable gradient is reduced over (data, fsdp) once. XLA:CPU has
    no reduce-scatter, so it shows as an all-reduce of the whole (fsdp-unsharded) gradient:
        G_trainable + R_trainable - G_embedding  <=  gradient all-reduces  <=  G_t + R_t
    (the embedding's gradient may arrive as an all-to-all of the lookup's cotangent).
  tensor parallelism (Megatron). Per decoder layer and step, all-reduces of one local
    [rows / (data fsdp), seq, hidden] activation A: o_proj and down_proj outputs in the
    forward and again in remat, the dx of the column-parallel projections in the backward
    (XLA:CPU reduces q/k/v and gate/up separately before summing: 5 instead of 2), so <= 9 A;
    the vision tower's layers 2 A_vision each (forward only); the embedding lookup and the LM
    head's dx about one A each. Anything beyond is a constraint that does not hold.

Without the activation constraints (mesh.activation_rules = ()) XLA's guess all-reduces
whole-batch float32 logits and gathers whole-batch activations: 3x the all-gather and 20x the
all-reduce bytes on fsdp=8, which these bounds reject.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llava_jax.training import hlo_stats

REPO = Path(__file__).resolve().parents[1]
ROWS, SEQ = 24, 64  # 24 appears in no parameter shape: a dim of 24 is the whole batch
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2)}

COMPILE = textwrap.dedent("""
    import json, math, sys
    import jax, numpy as np
    from llava_jax import sharding
    from llava_jax.models.config import get_preset
    from llava_jax.training import hlo_stats
    from llava_jax.training.config import default_config
    from llava_jax.training.state import build_setup, with_shardings
    assert jax.device_count() == 8, jax.devices()
    rows, seq, meshes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])

    def fsdp_bytes(abstract, shardings, mesh, prefix=""):
        # (G: gathered-over-fsdp bytes of fsdp-sharded leaves, R: per-device bytes of the rest)
        gathered = rest = 0
        leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
        for (path, leaf), spec_sharding in zip(leaves, jax.tree.leaves(
                shardings, is_leaf=lambda x: hasattr(x, "spec"))):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if not name.startswith(prefix):
                continue
            shard = math.prod(spec_sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            axes = {a for d in spec_sharding.spec if d for a in ((d,) if isinstance(d, str) else d)}
            if "fsdp" in axes:
                gathered += shard * mesh.shape["fsdp"]
            else:
                rest += shard
        return gathered, rest

    out = {}
    for label, shape in meshes.items():
        c = default_config(2)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
        c.model.dtype = "float32"
        if len(sys.argv) > 4:  # the same step without activation constraints
            c.mesh.activation_rules = ()
        model = get_preset("tiny").replace(dtype="float32", param_dtype="float32",
                                           remat_policy=c.model.remat_policy, scan_layers=True)
        mesh = sharding.make_mesh(c.mesh)
        s = build_setup(c, model, mesh, total_steps=10)
        batch = {n: jax.ShapeDtypeStruct((1, rows, seq), np.int32)
                 for n in ("input_ids", "labels", "segment_ids", "positions")}
        size = model.vision.image_size
        batch["pixel_values"] = jax.ShapeDtypeStruct((1, rows, 1, size, size, 3), np.float32)
        batch["image_mask"] = jax.ShapeDtypeStruct((1, rows, 1), np.bool_)
        batch = with_shardings(batch, {k: s.batch_sharding for k in batch})
        with jax.set_mesh(mesh):
            text = s.train_step.lower(
                with_shardings(s.abstract_trainable, s.trainable_shardings),
                with_shardings(s.abstract_frozen, s.frozen_shardings),
                with_shardings(s.abstract_opt, s.opt_shardings), batch).compile().as_text()
        g_t, r_t = fsdp_bytes(s.abstract_trainable, s.trainable_shardings, mesh)
        g_f, _ = fsdp_bytes(s.abstract_frozen, s.frozen_shardings, mesh)
        out[label] = {
            "summary": hlo_stats.collective_summary(text),
            "ops": [[op.kind, op.shapes, op.bytes, op.executions, op.op_name]
                    for op in hlo_stats.collective_ops(text)],
            "G_trainable": g_t, "R_trainable": r_t, "G_frozen": g_f,
            "G_decoder_layers": fsdp_bytes(s.abstract_trainable, s.trainable_shardings, mesh,
                                           "language_model/layers")[0],
            "G_embedding": fsdp_bytes(s.abstract_trainable, s.trainable_shardings, mesh,
                                      "language_model/embed_tokens")[0],
            "local_rows": rows // (shape[0] * shape[1]), "tensor": shape[2],
            "text": {"hidden": model.text.hidden_size, "layers": model.text.num_layers},
            "vision": {"hidden": model.vision.hidden_size, "tokens": model.vision.num_patches + 1,
                       "layers_run": model.vision.num_layers - 1},
        }
    print("RESULT" + json.dumps(out))
""")


def compile_and_count(*extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", COMPILE, str(ROWS), str(SEQ),
                           json.dumps(MESHES), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


@pytest.fixture(scope="module")
def counted():
    return compile_and_count()


def _ops(result, kind):
    return [op for op in result["ops"] if op[0] == kind]


def _listing(result, kind):
    ops = [hlo_stats.CollectiveOp(k, "", "", tuple((t, tuple(d)) for t, d in shapes), b, n, name)
           for k, shapes, b, n, name in _ops(result, kind)]
    return hlo_stats.format_ops(ops, 12)


def _whole_batch_activations(result, kind):
    """Floating results with all rows and all positions (or image tokens) in one array."""
    lengths = {SEQ, result["vision"]["tokens"], result["vision"]["tokens"] - 1}
    return [op for op in _ops(result, kind) for dtype, dims in op[1]
            if dtype.startswith(("f", "bf")) and ROWS in dims and lengths & set(dims)]


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_fsdp_gathers_each_weight_at_most_twice_and_never_activations(counted, mesh):
    result = counted[mesh]
    gathered = result["summary"]["bytes"]["all-gather"]
    assert result["summary"]["unknown_trip_counts"] == []
    low = 2 * result["G_decoder_layers"]
    high = 2 * (result["G_trainable"] + result["G_frozen"])
    assert low <= gathered <= high, (gathered, low, high, _listing(result, "all-gather"))
    assert not _whole_batch_activations(result, "all-gather"), _listing(result, "all-gather")
    assert result["summary"]["bytes"]["reduce-scatter"] == 0  # XLA:CPU forms none (docstring)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_gradients_reduced_once_and_activations_only_by_tensor_parallelism(counted, mesh):
    result = counted[mesh]
    reduced = result["summary"]["bytes"]["all-reduce"]
    gradients = result["G_trainable"] + result["R_trainable"]
    low = gradients - result["G_embedding"]
    activation = result["local_rows"] * SEQ * result["text"]["hidden"] * 4  # f32 bytes
    vision = result["local_rows"] * result["vision"]["tokens"] * result["vision"]["hidden"] * 4
    if result["tensor"] > 1:
        megatron = (9 * result["text"]["layers"] * activation
                    + 2 * result["vision"]["layers_run"] * vision + 2 * activation)
    else:
        megatron = 0
    high = 1.02 * gradients + megatron  # 2 %: loss / norm scalars
    assert low <= reduced <= high, (reduced, low, high, _listing(result, "all-reduce"))
    # No single all-reduce of a whole-batch activation (e.g. float32 logits of every row).
    whole = ROWS * SEQ * result["text"]["hidden"]
    assert all(math.prod(dims) < whole for op in _ops(result, "all-reduce") for _, dims in op[1]), \
        _listing(result, "all-reduce")


# ----- the HLO reader on hand-written modules -----

LOOP_HLO = """HloModule m, entry_computation_layout={()->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%x), dimensions={0}
  %ag-done = f32[8]{0} all-gather-done(%ag-start)
  %rs = (f32[2]{0}, bf16[4]{0}) reduce-scatter(%x, %x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%next, %ag-done)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%all-reduce-scatter.1 (w: f32[8]) -> f32[2] {
  %w = f32[8]{0} parameter(0)
  %sum = f32[8]{0} all-reduce(%w), replica_groups=[2,4]<=[8], to_apply=%add
  %offset = s32[] constant(0)
  ROOT %mine = f32[2]{0} dynamic-slice(%sum, %offset), dynamic_slice_sizes={2}
}

%branch_a (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%x), to_apply=%add
}

%branch_b (y: f32[8]) -> f32[8] {
  %y = f32[8]{0} parameter(0)
  ROOT %cp = f32[8]{0} collective-permute(%y), source_target_pairs={{0,1}}
}

ENTRY %main (arg: f32[8], flag: pred[]) -> f32[8] {
  %arg = f32[8]{0} parameter(0)
  %flag = pred[] parameter(1)
  %zero = s32[] constant(2)
  %start = s32[] copy(%zero)
  %init = (s32[], f32[8]{0}) tuple(%start, %arg)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %out = f32[8]{0} get-tuple-element(%loop), index=1
  %big = f32[1024]{0} all-gather(%out), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, metadata={op_name="x}y" source_line=1}
  %grad = f32[2]{0} fusion(%out), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %pick = f32[8]{0} conditional(%flag, %out, %out), branch_computations={%branch_a, %branch_b}
}
"""


def test_hlo_reader_counts_pairs_once_loops_by_trip_count_and_one_branch():
    summary = hlo_stats.collective_summary(LOOP_HLO)
    # The loop runs 5 - 2 = 3 times (no known_trip_count: read from the condition and the
    # copied start constant). all-gather: 3 x 8 f32 (the -done) + the 1024-element one.
    assert summary["unknown_trip_counts"] == []
    assert summary["bytes"]["all-gather"] == 3 * 32 + 4096
    # tuple: f32[2] + bf16[4], 3 times; and the TPU's all-reduce-scatter fusion (f32[2] kept
    # per device; its inner all-reduce is not counted).
    assert summary["bytes"]["reduce-scatter"] == 3 * (8 + 8) + 8
    # One branch runs: the heavier (both move 32 bytes here; ties take the first).
    assert summary["bytes"]["all-reduce"] + summary["bytes"]["collective-permute"] == 32
    assert summary["executions"]["all-gather"] == 4
    # Sent per device (ring estimate) over the groups read from the three spellings: 4
    # devices each; the loop's all-gather has no groups (counted as its result).
    assert summary["wire_bytes"]["all-gather"] == 3 * 32 + 4096 * 3 // 4
    assert summary["wire_bytes"]["reduce-scatter"] == (3 * 16 + 8) * 3


def test_hlo_reader_prefers_the_annotated_trip_count_and_reports_unknown_loops():
    annotated = LOOP_HLO.replace(
        "body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
    assert hlo_stats.collective_bytes(annotated)["reduce-scatter"] == 7 * 16 + 8
    unknown = LOOP_HLO.replace("%start = s32[] copy(%zero)", "%start = s32[] parameter(2)")
    summary = hlo_stats.collective_summary(unknown)
    assert summary["unknown_trip_counts"] == ["loop"]
    assert summary["bytes"]["reduce-scatter"] == 16 + 8  # the loop counted once
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_stats.collective_bytes("HloModule m\n")


# ----- the activation rules -----


def test_activation_rules_give_partition_specs_and_are_off_without_a_mesh():
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

    from llava_jax import sharding
    from llava_jax.models import partitioning as part

    rules = {name: part._as_axes(axes) for name, axes in sharding.DEFAULT_ACTIVATION_RULES}
    names = sharding.MESH_AXES
    mesh = AbstractMesh((2, 4, 2), names, axis_types=(AxisType.Auto,) * 3)
    spec = lambda shape, axes, m=mesh: part.logical_to_spec(shape, axes, rules, m)
    assert spec((16, 64, 128), part.RESIDUAL) == P(("data", "fsdp"), None, None)
    assert spec((16, 64, 4, 32), (part.BATCH, part.LENGTH, part.HEADS, part.HEAD_DIM)) == \
        P(("data", "fsdp"), None, "tensor", None)
    assert spec((16, 64, 512), (part.BATCH, part.LENGTH, part.VOCAB)) == \
        P(("data", "fsdp"), None, "tensor")
    # Dims the axes do not divide (a batch of 4 over 8 devices, 1 KV head over 2 tensor
    # shards) are left to XLA rather than padded or rejected; size-1 axes are dropped.
    assert spec((4, 1, 64, 32), (part.BATCH, part.KV_HEADS, part.LENGTH, part.HEAD_DIM)) == \
        P(P.UNCONSTRAINED, P.UNCONSTRAINED, None, None)
    small = AbstractMesh((1, 8, 1), names, axis_types=(AxisType.Auto,) * 3)
    assert spec((8, 64, 256), (part.BATCH, part.LENGTH, part.MLP), small) == P("fsdp", None, None)
    manual = AbstractMesh((2, 4, 2), names, axis_types=(AxisType.Manual, AxisType.Auto,
                                                        AxisType.Auto))
    assert spec((16, 64, 128), part.RESIDUAL, manual) == P(P.UNCONSTRAINED, None, None)

    x = jnp.ones((4, 8, 16))
    assert part.constrain(x, part.RESIDUAL) is x  # no rules installed
    with part.axis_rules(sharding.DEFAULT_ACTIVATION_RULES):
        assert part.current_rules()[part.BATCH] == ("data", "fsdp")
        assert part.constrain(x, part.RESIDUAL) is x  # no mesh in context
        one = jax.make_mesh((1, 1, 1), names, axis_types=(AxisType.Auto,) * 3,
                            devices=jax.devices()[:1])
        with jax.set_mesh(one):
            assert part.constrain(x, part.RESIDUAL) is x  # one device
    assert part.current_rules() is None
    with part.axis_rules(()):
        assert part.current_rules() is None  # () switches constraints off


def test_activation_rules_are_checked_at_start_up():
    from llava_jax import sharding

    sharding.check_activation_rules(sharding.DEFAULT_ACTIVATION_RULES)
    with pytest.raises(sharding.MeshConfigError, match="unknown mesh axes \\['model'\\]"):
        sharding.check_activation_rules((("activation_heads", "model"),))
    with pytest.raises(sharding.MeshConfigError, match="not a \\(logical axis, mesh axes\\)"):
        sharding.check_activation_rules((("activation_heads",),))
