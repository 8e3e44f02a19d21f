"""Every CPU backend against a dense reference written here, forward and gradients; segment
isolation; linear memory of blockwise; refusals and `auto`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ctxext_jax.attention import Mask, attention, choose_implementation, kernels, supports

BLOCKS = dict(block_q=8, block_kv=16)  # small tiles so odd lengths span partial blocks


def reference(q, k, v, keep, *, bias=None, alibi=None, dist=None, scale, softcap=None):
    """Dense attention with the boolean matrix keep [B, T, S], K/V repeated to H heads."""
    H, K = q.shape[2], k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), H // K, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), H // K, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k, precision="highest") * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if alibi is not None:
        s = s - alibi[None, :, None, None] * dist[:, None]
    s = jnp.where(keep[:, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * keep[:, None]  # rows with no key -> 0
    return jnp.einsum("bhts,bshd->bthd", p, v, precision="highest")


def pattern_matrix(
    B, T, S, *, causal=True, window=None, chunk=None, sinks=0, seg=None, pos=None, offset=0
):
    """keep [B, T, S] and q_pos - k_pos [B, T, S] from the rules, independent of Mask."""
    if pos is None:
        qp = np.broadcast_to(np.arange(T) + offset, (B, T))
        kp = np.broadcast_to(np.arange(S), (B, S))
    else:
        qp = kp = pos
    d = qp[:, :, None] - kp[:, None, :]
    base = np.ones((B, T, S), bool)
    if causal:
        base &= d >= 0
    if seg is not None:
        base &= seg[:, :, None] == seg[:, None, :]
    keep = base.copy()
    if window is not None:
        keep &= (d < window) if causal else (np.abs(d) < window)
    if chunk is not None:
        keep &= qp[:, :, None] // chunk == kp[:, None, :] // chunk
    if sinks:
        keep |= base & (kp[:, None, :] < sinks)
    return keep, d.astype(np.float32)


def documents(B, L, lengths):
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        start = 0
        for i, n in enumerate(lengths[b]):
            seg[b, start : start + n] = i
            pos[b, start : start + n] = np.arange(n)
            start += n
        seg[b, start:] = len(lengths[b])
        pos[b, start:] = np.arange(L - start)
    return seg, pos


DOCS = [[9, 20], [30, 2]]  # two packed rows of length 37 (the last document fills the rest)

CASES = {
    "causal_gqa": dict(H=8, K=2),
    "window": dict(window=5, H=4, K=4),
    "chunk_mqa": dict(chunk=8, H=4, K=1),
    "sinks_window": dict(window=6, sinks=3),
    "segments": dict(segments=True),
    "window_segments_sinks": dict(window=6, sinks=2, segments=True),
    "chunk_segments": dict(chunk=7, segments=True),
    "noncausal": dict(causal=False),
    "noncausal_window_segments": dict(causal=False, window=4, segments=True),
    "alibi": dict(alibi=True, H=8, K=2),
    "softcap_window": dict(softcap=2.0, window=9),
    "bias": dict(bias=True),
    "decode_1": dict(T=1, window=8, sinks=2),
    "decode_5": dict(T=5, H=8, K=2, alibi=True),
    "decode_5_chunk": dict(T=5, chunk=16),
}


def make_case(case, dtype=jnp.float32):
    c = dict(H=4, K=2, T=37, S=37, D=16, B=2) | case
    B, T, S, H, K, D = (c[n] for n in "BTSHKD")
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 6)
    q = jax.random.normal(keys[0], (B, T, H, D), dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), dtype)
    static = {n: c[n] for n in ("causal", "window", "chunk", "sinks") if n in c}
    mask_kw = dict(static, q_offset=S - T)
    seg = pos = None
    if c.get("segments"):
        seg, pos = documents(B, T, DOCS)
        s, p = jnp.asarray(seg), jnp.asarray(pos)
        mask_kw.update(q_segment_ids=s, kv_segment_ids=s, q_positions=p, kv_positions=p)
    keep, dist = pattern_matrix(B, T, S, seg=seg, pos=pos, offset=S - T, **static)
    extra = dict(scale=D**-0.5, softcap=c.get("softcap"))
    if c.get("bias"):
        extra["bias"] = jax.random.normal(keys[3], (1, H, T, S))
    if c.get("alibi"):
        extra["alibi_slopes"] = 2.0 ** -jnp.arange(1, H + 1, dtype=jnp.float32)
    w = jax.random.normal(keys[4], (B, T, H, D))
    return (q, k, v), Mask(**mask_kw), jnp.asarray(keep), jnp.asarray(dist), extra, w


def outputs_and_grads(f, args, w):
    """f(*args) and the grads of sum(w * f(*args)) wrt every arg, in one jitted computation."""
    loss = lambda *a: jnp.sum(w * f(*a).astype(jnp.float32))  # noqa: E731
    return jax.jit(lambda *a: (f(*a), jax.grad(loss, range(len(a)))(*a)))(*args)


@pytest.mark.parametrize("name", CASES)
def test_matches_reference_forward_and_grad(name):
    (q, k, v), mask, keep, dist, extra, w = make_case(CASES[name])
    bias = extra.pop("bias", None)
    slopes = extra.get("alibi_slopes")
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def ref(q, k, v, b=None):
        return reference(
            q,
            k,
            v,
            keep,
            bias=b,
            alibi=slopes,
            dist=dist,
            scale=extra["scale"],
            softcap=extra["softcap"],
        )

    want, want_grads = outputs_and_grads(ref, args, w)
    for impl in ("xla", "blockwise"):

        def fn(q, k, v, b=None, impl=impl):
            return attention(q, k, v, mask=mask, bias=b, implementation=impl, **extra, **BLOCKS)

        out, grads = outputs_and_grads(fn, args, w)
        assert out.shape == q.shape and out.dtype == q.dtype
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5, err_msg=impl)
        for g, gw in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(g, gw, atol=1e-4, rtol=1e-4, err_msg=impl)


@pytest.mark.parametrize("name", ["causal_gqa", "window_segments_sinks"])
def test_bfloat16(name):
    (q, k, v), mask, keep, dist, extra, w = make_case(CASES[name], jnp.bfloat16)
    ref = lambda q, k, v: reference(q, k, v, keep, scale=extra["scale"], softcap=extra["softcap"])  # noqa: E731
    want, want_grads = outputs_and_grads(ref, (q, k, v), w)
    for impl in ("xla", "blockwise"):
        fn = lambda q, k, v, impl=impl: attention(  # noqa: E731
            q, k, v, mask=mask, implementation=impl, **extra, **BLOCKS
        )
        out, grads = outputs_and_grads(fn, (q, k, v), w)
        assert out.dtype == jnp.bfloat16
        tol = 2e-2 * float(jnp.abs(want).max())
        np.testing.assert_allclose(out.astype(jnp.float32), want, atol=tol, err_msg=impl)
        for g, gw in zip(grads, want_grads, strict=True):
            tol = 2e-2 * float(jnp.abs(gw).max())
            np.testing.assert_allclose(g.astype(jnp.float32), gw, atol=tol, err_msg=impl)


@pytest.mark.parametrize(
    "pattern",
    [
        dict(window=5, sinks=3),
        dict(chunk=6, sinks=2),
        # Non-causal: a document starting inside a query block shows its sinks to the block's
        # rows even where they lie past the window / chunk range.
        dict(causal=False, window=2, sinks=9),
        dict(causal=False, chunk=3, sinks=9),
    ],
    ids=str,
)
def test_blockwise_packed_sinks_many_documents(pattern):
    """Per-document sinks are found at run time; random packings with many documents per
    block and per batch row must still match the dense reference."""
    rng = np.random.default_rng()
    B, T = 3, 53
    lengths = [list(rng.integers(1, 12, size=6)) for _ in range(B)]
    seg, pos = documents(
        B, T, [np.minimum(np.cumsum(n), T) - np.minimum(np.cumsum(n) - n, T) for n in lengths]
    )
    s, p = jnp.asarray(seg), jnp.asarray(pos)
    mask = Mask(**pattern, q_segment_ids=s, kv_segment_ids=s, q_positions=p, kv_positions=p)
    keep, _ = pattern_matrix(B, T, T, seg=seg, pos=pos, **pattern)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 4)
    q = jax.random.normal(keys[0], (B, T, 4, 8))
    k = jax.random.normal(keys[1], (B, T, 2, 8))
    v = jax.random.normal(keys[2], (B, T, 2, 8))
    w = jax.random.normal(keys[3], q.shape)
    fn = lambda q, k, v: attention(  # noqa: E731
        q, k, v, mask=mask, implementation="blockwise", block_q=4, block_kv=4
    )
    out, grads = outputs_and_grads(fn, (q, k, v), w)
    ref = lambda q, k, v: reference(q, k, v, jnp.asarray(keep), scale=8**-0.5)  # noqa: E731
    want, want_grads = outputs_and_grads(ref, (q, k, v), w)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for g, gw in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, gw, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_rows_without_keys_return_zero(impl):
    """Queries whose segment has no key (padding against a cache) give 0, and finite grads."""
    q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 10, 2, 8))
    mask = Mask(
        q_segment_ids=jnp.array([[1, 1, 1, 1, 7, 7]]),
        kv_segment_ids=jnp.ones((1, 10), jnp.int32),
        q_offset=4,
    )
    f = jax.jit(
        lambda q, k: attention(q, k, k, mask=mask, implementation=impl, block_q=4, block_kv=4)
    )
    out = f(q, k)
    np.testing.assert_array_equal(out[:, 4:], 0)
    assert float(jnp.abs(out[:, :4]).min()) > 0
    grads = jax.grad(lambda q, k: f(q, k).sum(), argnums=(0, 1))(q, k)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def isolation_backends():
    def splash(q, k, v, mask):
        return kernels._splash(q, k, v, mask, q.shape[-1] ** -0.5, None, interpret=True)

    def cudnn_translation(q, k, v, mask):
        return kernels._cudnn(q, k, v, mask, None, q.shape[-1] ** -0.5, dpa_implementation="xla")

    def via(impl):
        return lambda q, k, v, mask: attention(q, k, v, mask=mask, implementation=impl, **BLOCKS)

    return {
        "xla": via("xla"),
        "blockwise": via("blockwise"),
        "splash_interpret": splash,
        "cudnn_translation": cudnn_translation,
    }


@pytest.mark.parametrize("backend", list(isolation_backends()))
@pytest.mark.parametrize("pattern", [dict(), dict(window=16)], ids=str)
def test_segment_isolation(backend, pattern):
    """Changing the keys and values of one packed document never changes another's output."""
    fn = isolation_backends()[backend]
    T = 128  # splash tiles are 128 rows
    seg, pos = documents(1, T, [[40, 50]])
    s, p = jnp.asarray(seg), jnp.asarray(pos)
    mask = Mask(**pattern, q_segment_ids=s, kv_segment_ids=s, q_positions=p, kv_positions=p)
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 4)
    q = jax.random.normal(keys[0], (1, T, 2, 16))
    k = jax.random.normal(keys[1], (1, T, 2, 16))
    v = jax.random.normal(keys[2], (1, T, 2, 16))
    doc = jnp.asarray(seg == 1)[:, :, None, None]
    noise = 10.0 * jax.random.normal(keys[3], k.shape)
    base = fn(q, k, v, mask)
    moved = fn(q, jnp.where(doc, k + noise, k), jnp.where(doc, v - noise, v), mask)
    others = ~doc[0, :, 0, 0]
    np.testing.assert_allclose(moved[0, others], base[0, others], atol=1e-6, rtol=0)
    assert float(jnp.abs(moved[0, ~others] - base[0, ~others]).max()) > 1e-2


def _mesh(**sizes):
    from ctxext_jax import sharding

    shape = tuple((a, sizes.get(a, 1)) for a in sharding.MESH_AXES)
    devices = jax.devices()[: int(np.prod(list(sizes.values())))]
    return sharding.make_mesh(sharding.MeshConfig(shape=shape), devices), sharding.DEFAULT_RULES


def test_splash_interpret_matches_xla_with_sinks_per_device():
    """The splash path (Pallas interpreter) honours window + sinks + segments like xla, run the
    way `attention` runs a fused kernel on a mesh: `on_mesh` over data x tensor, each device on
    its own batch row and GQA group."""
    T = 128
    seg, _ = documents(2, T, [[60], [100]])
    s = jnp.asarray(seg)
    mask = Mask(window=20, sinks=4, q_segment_ids=s, kv_segment_ids=s)
    rng = np.random.default_rng()
    q = rng.normal(size=(2, T, 4, 16)).astype(np.float32)
    k, v = (rng.normal(size=(2, T, 2, 16)).astype(np.float32) for _ in range(2))
    mesh, rules = _mesh(data=2, tensor=2)

    def splash(q, k, v, mask, bias, slopes):
        assert q.shape == (1, T, 2, 16) and k.shape == (1, T, 1, 16)  # one row, one group
        return kernels._splash(q, k, v, mask, 0.25, 3.0, interpret=True)

    got = jax.jit(lambda q, k, v: kernels.on_mesh(splash, q, k, v, mask=mask, mesh=mesh,
                                                  rules=rules))(q, k, v)  # fmt: skip
    want = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, scale=0.25, softcap=3.0,
                                             implementation="xla"))(q, k, v)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_fused_kernel_wrapper_is_per_device_on_a_mesh():
    """`on_mesh` (what cudnn and splash run in on a mesh) with the dense kernel standing in for
    the fused one, on data x fsdp x tensor: output and gradients (q, k, v, bias, ALiBi slopes)
    equal the single-device ones, and the compiled step holds no all-gather (batch rows and
    heads stay on their device; only the replicated bias and slopes sum their gradients)."""
    B, T, H, K, D = 4, 16, 4, 2, 8
    rng = np.random.default_rng()  # numpy inputs: no eager XLA op (each compiles, ~1 s)
    q, w = (rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(B, T, K, D)).astype(np.float32) for _ in range(2))
    bias = rng.normal(size=(1, H, T, T)).astype(np.float32)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    seg, pos = documents(B, T, [[5], [4, 7], [], [3]])
    s, p = jnp.asarray(seg), jnp.asarray(pos)
    mask = Mask(window=6, q_segment_ids=s, kv_segment_ids=s, q_positions=p, kv_positions=p)
    mesh, rules = _mesh(data=2, fsdp=2, tensor=2)

    def stand_in(q, k, v, mask, bias, slopes):
        assert q.shape == (1, T, 2, D) and k.shape == (1, T, 1, D)
        return kernels._xla(q, k, v, mask, bias, slopes, 0.3, None)

    def loss(fn):
        return lambda q, k, v, b, a: jnp.sum(fn(q, k, v, b, a) * w)

    def sharded(q, k, v, b, a):
        return kernels.on_mesh(stand_in, q, k, v, mask=mask, bias=b, alibi_slopes=a,
                               mesh=mesh, rules=rules)  # fmt: skip

    def single(q, k, v, b, a):
        return attention(q, k, v, mask=mask, bias=b, alibi_slopes=a, scale=0.3,
                         implementation="xla")  # fmt: skip

    spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    place = [NamedSharding(mesh, spec)] * 3 + [NamedSharding(mesh, PartitionSpec())] * 2
    args = (q, k, v, bias, slopes)
    step = jax.jit(jax.value_and_grad(loss(sharded), argnums=range(5)), in_shardings=place)
    step = step.lower(*args).compile()
    got = step(*args)
    want = jax.jit(jax.value_and_grad(loss(single), argnums=range(5)))(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    hlo = step.as_text()
    assert "all-gather" not in hlo, [line for line in hlo.splitlines() if "all-gather" in line]


def test_splash_interpret_length_not_a_multiple_of_512():
    """Splash tiles must divide the length: T = 640 (a multiple of 128 only) still runs."""
    T = 640
    rng = np.random.default_rng()
    q = rng.normal(size=(1, T, 2, 8)).astype(np.float32)
    k, v = (rng.normal(size=(1, T, 1, 8)).astype(np.float32) for _ in range(2))
    mask = Mask(window=100)
    assert supports("splash", mask, platform="tpu", T=T, S=T) is None
    got = jax.jit(lambda q, k, v: kernels._splash(q, k, v, mask, 0.3, None, interpret=True))(
        q, k, v
    )
    want = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, scale=0.3,
                                             implementation="xla"))(q, k, v)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blockwise_sharded_batch_and_heads():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    (q, k, v), mask, *_ = make_case(dict(window=6, sinks=2, segments=True, H=8, K=4))
    spec = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
    f = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, implementation="blockwise", **BLOCKS))
    out = f(*(jax.device_put(x, spec) for x in (q, k, v)))
    want = attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def compiled_bytes(impl, T, **mask_kw):
    """Temp bytes of compiled forward + backward, compile only."""
    shape = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
    mask = Mask(**mask_kw)

    def loss(q, k, v):
        return attention(q, k, v, mask=mask, implementation=impl).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    small, large = compiled_bytes("blockwise", 16384), compiled_bytes("blockwise", 65536)
    assert large / small < 4.5, (small, large)
    assert large < 64 * 65536 * 2 * 16 * 4, large  # a few dozen copies of q, far below T*S
    assert large < 65536**2 * 4 / 100
    windowed = compiled_bytes("blockwise", 65536, window=1024, sinks=4)
    assert windowed < 64 * 65536 * 2 * 16 * 4
    # The dense reference holds the T x S logits: quadratic.
    x1, x2 = compiled_bytes("xla", 1024), compiled_bytes("xla", 2048)
    assert x2 / x1 > 3.5 and x2 > 2048 * 2048 * 2 * 4, (x1, x2)


def test_refusals():
    gpu, tpu = dict(platform="gpu", dtype=jnp.bfloat16), dict(platform="tpu")
    assert "chunk" in supports("cudnn", Mask(chunk=8), **gpu)
    assert "sink" in supports("cudnn", Mask(window=8, sinks=4), **gpu)
    assert "soft" in supports("cudnn", Mask(), softcap=True, **gpu)
    assert "ALiBi" in supports("cudnn", Mask(), alibi=True, **gpu)
    assert "bfloat16" in supports("cudnn", Mask(), platform="gpu", dtype=jnp.float32)
    assert supports("cudnn", Mask(window=8), **gpu) is None
    seg = jnp.zeros((1, 16384), jnp.int32)  # packed rows: a dense mask, short lengths only
    docs = Mask(q_segment_ids=seg, kv_segment_ids=seg)
    assert "dense [B, 1, T, S] mask" in supports("cudnn", docs, T=16384, S=16384, **gpu)
    assert supports("cudnn", docs, T=4096, S=4096, **gpu) is None
    assert "GPU" in supports("cudnn", Mask(), platform="cpu")
    assert "TPU" in supports("splash", Mask(), platform="gpu")
    assert "bias" in supports("splash", Mask(), bias=True, **tpu)
    pos = jnp.zeros((1, 256), jnp.int32)
    packed = Mask(chunk=64, q_positions=pos, kv_positions=pos)
    assert "chunks or sinks" in supports("splash", packed, T=256, S=256, **tpu)
    assert "multiple of 128" in supports("splash", Mask(), T=100, S=100, **tpu)
    assert supports("splash", Mask(window=64, sinks=4), T=256, S=256, **tpu) is None
    assert "unknown" in supports("flash", Mask(), platform="cpu")
    q = jnp.zeros((1, 8, 2, 8))
    for impl in ("cudnn", "splash"):
        with pytest.raises(ValueError, match=f"implementation='{impl}'"):
            attention(q, q, q, mask=Mask(), implementation=impl)


def test_auto_choice():
    shape = dict(dtype=jnp.bfloat16, head_dim=128)
    assert choose_implementation(Mask(), platform="cpu", T=128, S=128, **shape) == "xla"
    assert choose_implementation(Mask(), platform="cpu", T=512, S=512, **shape) == "blockwise"
    assert (
        choose_implementation(Mask(window=64), platform="gpu", T=4096, S=4096, **shape) == "cudnn"
    )
    assert (
        choose_implementation(Mask(chunk=64), platform="gpu", T=4096, S=4096, **shape)
        == "blockwise"
    )
    seg = jnp.zeros((1, 4096), jnp.int32)
    packed = Mask(q_segment_ids=seg, kv_segment_ids=seg)
    assert choose_implementation(packed, platform="gpu", T=4096, S=4096, **shape) == "blockwise"
    assert choose_implementation(packed, platform="tpu", T=4096, S=4096, **shape) == "splash"
    assert (
        choose_implementation(Mask(), platform="tpu", T=4096, S=4096, alibi=True, **shape)
        == "blockwise"
    )
    q = jnp.ones((1, 8, 2, 8))
    np.testing.assert_allclose(attention(q, q, q, mask=Mask()), 1.0, rtol=1e-6)


def test_bad_arguments_raise():
    q = jnp.zeros((1, 8, 3, 8))
    k = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="multiple of K"):
        attention(q, k, k, mask=Mask())
    q = jnp.zeros((1, 8, 4, 8))
    with pytest.raises(ValueError, match="bias"):
        attention(q, k, k, mask=Mask(), bias=jnp.zeros((1, 4, 8, 7)))
    with pytest.raises(ValueError, match="alibi_slopes"):
        attention(q, k, k, mask=Mask(), alibi_slopes=jnp.zeros(2))
    with pytest.raises(ValueError, match="block_q"):
        attention(q, k, k, mask=Mask(), implementation="blockwise", block_q=0)
