"""Attention implementations (models/attention.py): every one that runs on CPU equals the
`xla` reference in forward and gradients (padding, packed rows, GQA, the KV cache); the
chunked backward stores no [q, kv] matrix; the choice logic; splash compiled for a TPU."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.inference import generation
from llava_jax.models import attention
from llava_jax.models.attention import AttentionMask
from llava_jax.models.config import LlavaConfig, get_preset
from llava_jax.models.llava import create_model

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(rng, batch, q_len, kv_len, heads, kv_heads, head_dim=16):
    q = rng.normal(size=(batch, q_len, heads, head_dim))
    k, v = (rng.normal(size=(batch, kv_heads, kv_len, head_dim)) for _ in range(2))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _segments(kind: str, batch: int, seq: int) -> np.ndarray:
    """'padded': right padding of different lengths; 'packed': segments 1..k, then padding."""
    segments = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        if kind == "padded":
            segments[row, :seq - 3 - 5 * row] = 1
        else:
            bounds = np.linspace(0, seq - 2 - row, 4 + row).astype(int)
            for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
                segments[row, start:stop] = index + 1
    return segments


def _forward_and_grads(fn, q, k, v, mask, cotangent):
    """Output and d(sum(out * cotangent))/d(q, k, v)."""
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return out, vjp(cotangent)


def _assert_same(fn, q, k, v, mask, rows=None, tol=TOL):
    """fn equals xla_attention in output and q/k/v gradients; `rows` [b, q] limits the
    comparison (and the cotangent) to those query rows."""
    rng = np.random.default_rng(1)
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    if rows is not None:
        cotangent = cotangent * rows[:, :, None, None]
    ref_out, ref_grads = _forward_and_grads(attention.xla_attention, q, k, v, mask, cotangent)
    out, grads = _forward_and_grads(fn, q, k, v, mask, cotangent)
    keep = 1.0 if rows is None else rows[:, :, None, None]
    np.testing.assert_allclose(out * keep, ref_out * keep, **tol)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, **tol, err_msg=f"d{name}")


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_chunked_equals_xla(kind, heads, kv_heads):
    """Several query and key blocks (37 = 4 blocks of 10, the last padded), every row."""
    q, k, v = _qkv(np.random.default_rng(0), 2, 37, 37, heads, kv_heads)
    mask = AttentionMask.for_sequence(jnp.asarray(_segments(kind, 2, 37)))
    fn = jax.jit(lambda q, k, v, mask: attention.chunked_attention(q, k, v, mask, block=10))
    _assert_same(fn, q, k, v, mask)


@pytest.mark.parametrize("q_len,index", [(6, 20), (1, 31)])
def test_chunked_equals_xla_against_a_kv_cache(q_len, index):
    """A prefill chunk (6 queries) and a decode step (1) against a 48-slot cache whose rows
    hold different amounts of left-padded history; empty slots are segment 0."""
    q, k, v = _qkv(np.random.default_rng(2), 2, q_len, 48, 4, 2)
    kv_segments = np.zeros((2, 48), np.int32)
    kv_segments[0, 3:index], kv_segments[1, 12:index] = 1, 1
    mask = AttentionMask.for_cache(jnp.ones((2, q_len), jnp.int32), jnp.asarray(kv_segments)
                                   .at[:, index:index + q_len].set(1), index)
    fn = jax.jit(lambda q, k, v, mask: attention.chunked_attention(q, k, v, mask, block=16))
    _assert_same(fn, q, k, v, mask)


def test_cudnn_argument_mapping_equals_xla():
    """cuDNN itself needs an NVIDIA GPU; its mask / is_causal mapping runs here through
    jax.nn.dot_product_attention's XLA path. Padding rows are implementation-defined."""
    q, k, v = _qkv(np.random.default_rng(3), 2, 24, 24, 4, 2)
    segments = _segments("packed", 2, 24)
    mask = AttentionMask.for_sequence(jnp.asarray(segments))
    fn = lambda q, k, v, mask: attention.cudnn_attention(q, k, v, mask, implementation="xla")
    _assert_same(fn, q, k, v, mask, rows=jnp.asarray(segments != 0, jnp.float32))


def test_splash_kernel_in_the_pallas_interpreter_equals_xla():
    """The TPU kernel's own code, run by the Pallas interpreter on CPU: packed rows,
    padding, GQA, forward and backward kernels. Padding rows are implementation-defined."""
    q, k, v = _qkv(np.random.default_rng(4), 2, 128, 128, 4, 2, head_dim=32)
    segments = _segments("packed", 2, 128)
    mask = AttentionMask.for_sequence(jnp.asarray(segments))
    fn = jax.jit(lambda q, k, v, mask: attention.splash_attention(q, k, v, mask, interpret=True))
    _assert_same(fn, q, k, v, mask, rows=jnp.asarray(segments != 0, jnp.float32))


def test_chunked_backward_stores_no_score_matrix():
    """At 1024 tokens one f32 [heads, q, kv] matrix is 16 MiB; xla's backward keeps it (and
    more), chunked's temporaries are a few [heads, block, block] tiles."""
    batch, seq, heads, kv_heads, head_dim = 1, 1024, 4, 2, 32
    shapes = (jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.float32),
              *[jax.ShapeDtypeStruct((batch, kv_heads, seq, head_dim), jnp.float32)] * 2,
              jax.ShapeDtypeStruct((batch, seq), jnp.int32))

    def temp_bytes(fn):
        def grads(q, k, v, segments):
            mask = AttentionMask.for_sequence(segments)
            return jax.grad(lambda *a: jnp.sum(fn(*a, mask) ** 2), argnums=(0, 1, 2))(q, k, v)
        return jax.jit(grads).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    matrix = batch * heads * seq * seq * 4
    xla, chunked = temp_bytes(attention.xla_attention), temp_bytes(attention.chunked_attention)
    assert xla >= 2 * matrix, (xla, matrix)
    assert chunked < matrix / 2 and chunked * 8 < xla, (chunked, xla, matrix)


# ----------------------------------------------------------------------------------------------
# The model: the same weights, two implementations


def _model(implementation: str):
    return create_model(get_preset("tiny", attention=implementation), seed=5)


def test_decoder_forward_and_param_grads_equal_xla_with_packed_rows(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", 16)  # 40 tokens: 3 blocks of queries and keys
    segments = _segments("packed", 2, 40)
    positions = np.zeros_like(segments)
    for row in range(2):
        for segment in set(segments[row]) - {0}:
            where = segments[row] == segment
            positions[row, where] = np.arange(where.sum())
    ids = jnp.asarray(np.random.default_rng(6).integers(3, 500, segments.shape), jnp.int32)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=(2, 40, 512)), jnp.float32)

    def logits_and_grads(model):
        graphdef, params = nnx.split(model.language_model, nnx.Param)  # the decoder's

        def loss(params):
            decoder = nnx.merge(graphdef, params)
            logits = decoder(decoder.embed(ids), jnp.asarray(positions), jnp.asarray(segments))
            return jnp.sum(logits * weights * (segments != 0)[:, :, None]), logits
        grads, logits = jax.grad(loss, has_aux=True)(params)
        return logits, grads

    ref_logits, ref_grads = logits_and_grads(_model("xla"))
    got_logits, got_grads = logits_and_grads(_model("chunked"))
    np.testing.assert_allclose(got_logits, ref_logits, **TOL)
    for (path, got), (_, want) in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                                      jax.tree_util.tree_leaves_with_path(ref_grads)):
        # Sums over 40 x 512 weighted logits: gradients reach ~1e2, so 1e-5 of each
        # tensor's largest entry (float32 summation order differs between the two).
        scale = max(float(jnp.abs(want).max()), 1.0)
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("unstack", [True, False])
def test_generate_with_chunked_equals_xla(monkeypatch, unstack):
    """Prefill + decode through the model's own forward with a KV cache; 16-token blocks so
    the 32-slot prompt bucket and the cache span several blocks."""
    monkeypatch.setattr(attention, "BLOCK", 16)
    config = get_preset("tiny")
    rng = np.random.default_rng(0)
    image = [config.image_token_index] * config.num_image_tokens
    rows = [[1, *rng.integers(3, 500, 5), *image, *rng.integers(3, 500, 7)],
            [1, *rng.integers(3, 500, 11)]]
    ids = np.zeros((2, max(map(len, rows))), np.int32)
    mask = np.zeros_like(ids)
    for index, row in enumerate(rows):  # right padded: generate left-aligns
        ids[index, :len(row)], mask[index, :len(row)] = row, 1
    pixels = rng.normal(size=(2, 1, 32, 32, 3)).astype(np.float32)
    kwargs = dict(attention_mask=mask, image_mask=np.array([[True], [False]]),
                  max_new_tokens=8, unstack_layers=unstack)
    want = generation.generate(_model("xla"), ids, pixels, **kwargs)
    got = generation.generate(_model("chunked"), ids, pixels, **kwargs)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# Choosing


def test_auto_resolves_per_backend_and_length():
    select = attention.select_implementation
    assert select("auto", "tpu", 1) == "splash"
    assert select("auto", "gpu", 2048, "NVIDIA H100 80GB HBM3") == "cudnn"
    assert select("auto", "gpu", 2048, "AMD Instinct MI300X") == "chunked"
    assert select("auto", "cpu", attention.SHORT_QUERIES - 1) == "xla"
    assert select("auto", "cpu", attention.SHORT_QUERIES) == "chunked"
    for name in ("xla", "chunked", "splash"):
        assert select(name, "cpu", 8) == name


def test_cudnn_off_nvidia_is_a_clear_error():
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attention.select_implementation("cudnn", "cpu", 8, "cpu")
    model = _model("cudnn")
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
        model(jnp.ones((1, 4), jnp.int32))


def test_splash_off_tpu_runs_the_fallback():
    """Off TPU, 'splash' stages the kernel for TPU compiles only; here the fallback runs."""
    q, k, v = _qkv(np.random.default_rng(5), 1, 12, 12, 4, 2)
    mask = AttentionMask.for_sequence(jnp.ones((1, 12), jnp.int32))
    splash = jax.jit(lambda *a: attention.dot_product_attention(*a, implementation="splash"))
    np.testing.assert_allclose(splash(q, k, v, mask), attention.xla_attention(q, k, v, mask),
                               **TOL)


def test_the_choice_is_logged_once(caplog):
    attention._LOGGED.clear()
    q, k, v = _qkv(np.random.default_rng(5), 1, 8, 8, 4, 2)
    mask = AttentionMask.for_sequence(jnp.ones((1, 8), jnp.int32))
    with caplog.at_level(logging.INFO, logger="absl"):
        for _ in range(3):
            attention.dot_product_attention(q, k, v, mask, "auto")
    lines = [r.getMessage() for r in caplog.records if "attention='auto'" in r.getMessage()]
    assert lines == [f"attention='auto' on this cpu process: xla below {attention.SHORT_QUERIES}"
                     " queries, chunked from there; splash in programs compiled for TPU"]


def test_config_field_defaults_validates_and_old_configs_load():
    old = get_preset("tiny").to_dict()
    del old["attention"]  # config.json written before the field existed
    assert LlavaConfig.from_dict(old).attention == "auto"
    assert LlavaConfig.from_dict(get_preset("tiny", attention="chunked").to_dict()).attention \
        == "chunked"
    with pytest.raises(ValueError, match="attention='flash'; use one of"):
        get_preset("tiny", attention="flash")


# ----------------------------------------------------------------------------------------------
# Splash compiled by the real TPU compiler (libtpu) for an abstract v5p slice


@pytest.fixture(scope="module")
def tpu_devices():
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the `tpu` extra")
    from jax.experimental import topologies
    # Another process on this machine may hold libtpu's lock file; compiling needs no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    except Exception as error:  # noqa: BLE001 - any libtpu start-up failure means: cannot test
        pytest.skip(f"no TPU topology here: {error}")


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 2, 2)])
def test_splash_compiles_for_tpu_under_auto(tpu_devices, mesh_shape):
    """'auto' on this CPU process stages splash for TPU: the TPU compile holds the Mosaic
    kernels (forward, dq, dkv), shard_map'd over batch (fsdp) and heads (tensor)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    size = int(np.prod(mesh_shape))
    mesh = Mesh(np.array(tpu_devices[:size]).reshape(mesh_shape), ("data", "fsdp", "tensor"))
    batch_axes = ("data", "fsdp")
    batch, seq, heads, kv_heads, head_dim = 4, 512, 8, 4, 128

    def struct(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    args = (struct((batch, seq, heads, head_dim), jnp.bfloat16, P(batch_axes, None, "tensor")),
            *[struct((batch, kv_heads, seq, head_dim), jnp.bfloat16, P(batch_axes, "tensor"))] * 2,
            struct((batch, seq), jnp.int32, P(batch_axes)))

    def grads(q, k, v, segments):
        mask = AttentionMask.for_sequence(segments)
        loss = lambda *a: jnp.sum(attention.dot_product_attention(*a, mask, "auto")
                                  .astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh):
        compiled = jax.jit(grads).lower(*args).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") == 3, "splash forward, dq and dkv kernels"
    assert "all-gather" not in text  # each device runs the kernel on its own rows / heads


# ----------------------------------------------------------------------------------------------
# Sliding-window attention (Mistral): one more condition in the same mask, in every kernel


def test_sliding_window_mask_is_the_transformers_rule():
    """Key j is visible to query i iff 0 <= i - j < window (transformers' sliding_window_overlay),
    within the segment; the same rule against a cache, by slot."""
    segments = jnp.asarray(_segments("packed", 1, 20))
    dense = np.asarray(AttentionMask.for_sequence(segments, window=4).dense())[0, 0]
    seg = np.asarray(segments)[0]
    i, j = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    expected = (i - j >= 0) & (i - j < 4) & (seg[:, None] == seg[None]) & (seg[None] != 0)
    np.testing.assert_array_equal(dense, expected)
    cache = AttentionMask.for_cache(jnp.ones((1, 1), jnp.int32), jnp.ones((1, 12), jnp.int32), 9,
                                    window=4)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(cache.dense())[0, 0, 0]), [6, 7, 8, 9])


def test_chunked_equals_xla_with_a_sliding_window():
    """Window 7 over blocks of 10, packed rows: whole blocks behind the window are skipped,
    forward and backward."""
    q, k, v = _qkv(np.random.default_rng(5), 2, 37, 37, 4, 2)
    mask = AttentionMask.for_sequence(jnp.asarray(_segments("packed", 2, 37)), window=7)
    fn = jax.jit(lambda q, k, v, mask: attention.chunked_attention(q, k, v, mask, block=10))
    _assert_same(fn, q, k, v, mask)
    full = AttentionMask.for_sequence(mask.q_segments)
    assert not np.allclose(attention.xla_attention(q, k, v, full),
                           attention.xla_attention(q, k, v, mask), atol=1e-3)


def test_chunked_equals_xla_with_a_sliding_window_against_a_kv_cache():
    q, k, v = _qkv(np.random.default_rng(6), 2, 3, 48, 4, 2)
    kv_segments = np.zeros((2, 48), np.int32)
    kv_segments[0, 2:30], kv_segments[1, 15:30] = 1, 1
    mask = AttentionMask.for_cache(jnp.ones((2, 3), jnp.int32),
                                   jnp.asarray(kv_segments).at[:, 27:30].set(1), 27, window=9)
    fn = jax.jit(lambda q, k, v, mask: attention.chunked_attention(q, k, v, mask, block=16))
    _assert_same(fn, q, k, v, mask)


def test_cudnn_and_splash_take_the_sliding_window():
    """cuDNN's argument mapping (through jax's XLA path) and the splash kernel (a causal
    LocalMask, in the Pallas interpreter) with window 40 over 128 packed tokens."""
    q, k, v = _qkv(np.random.default_rng(7), 2, 128, 128, 4, 2, head_dim=32)
    segments = _segments("packed", 2, 128)
    mask = AttentionMask.for_sequence(jnp.asarray(segments), window=40)
    rows = jnp.asarray(segments != 0, jnp.float32)
    cudnn = lambda q, k, v, mask: attention.cudnn_attention(q, k, v, mask, implementation="xla")
    _assert_same(cudnn, q, k, v, mask, rows=rows)
    splash = jax.jit(lambda q, k, v, mask: attention.splash_attention(q, k, v, mask,
                                                                      interpret=True))
    _assert_same(splash, q, k, v, mask, rows=rows)


def test_splash_with_a_sliding_window_compiles_for_tpu(tpu_devices):
    """The TPU compiler builds the windowed splash kernels (forward, dq, dkv) at 1024 tokens,
    window 256 (tiles wholly behind the window are not in the mask's block table)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(tpu_devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                       sharding=NamedSharding(mesh, P()))
    args = (struct((1, 1024, 8, 128), jnp.bfloat16),
            *[struct((1, 4, 1024, 128), jnp.bfloat16)] * 2, struct((1, 1024), jnp.int32))

    def grads(q, k, v, segments):
        mask = AttentionMask.for_sequence(segments, window=256)
        loss = lambda *a: jnp.sum(attention.dot_product_attention(*a, mask, "splash")
                                  .astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh):
        text = jax.jit(grads).lower(*args).compile().as_text()
    assert text.count("tpu_custom_call") == 3


def test_chunked_bf16_backward_runs_on_cpu_at_training_shapes():
    """bf16 rows of 512 tokens, 4 rows x 8 heads (what `auto` picks chunked for on CPU): the
    dq dot once hit XLA:CPU's missing bf16 x bf16 = f32 DotThunk kernel. Gradients follow the
    float32 ones to bf16 precision."""
    from llava_jax.models.attention import AttentionMask, chunked_attention

    rng = np.random.default_rng(0)
    b, s, h, d = 4, 512, 8, 64
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, h, s, d)).astype(np.float32) for _ in range(2))
    mask = AttentionMask.for_sequence(jnp.ones((b, s), jnp.int32))
    grad = jax.jit(jax.grad(lambda q, k, v: chunked_attention(q, k, v, mask).astype(
        jnp.float32).sum(), argnums=(0, 1, 2)))
    low = grad(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    full = grad(*(jnp.asarray(x) for x in (q, k, v)))
    for a, e in zip(low, full):
        a, e = np.asarray(a, np.float32), np.asarray(e)
        assert np.linalg.norm(a - e) < 0.05 * np.linalg.norm(e)
