"""Decoding: cached decode equals the full forward, rings keep window semantics, shardings agree,
one compilation per bucket, reproducible sampling, clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxext_jax import decode, sharding
from ctxext_jax.decode import runner
from ctxext_jax.decode.sampling import filter_logits
from ctxext_jax.model import Decoder, ModelConfig
from ctxext_jax.steps import build_model

PROMPT = [5, 9, 2, 33, 17, 8, 41, 3, 60, 12]  # 10 tokens: longer than the window and the chunk
STEPS = 5
# One model covers G, L (window 6 < prompt, 2 sinks) and C (chunk 6): every ring has 8 slots.
MASKS = dict(layer_pattern="LCG", window=6, chunk=6, sinks=2)


def _rope(**fields):
    return tuple(sorted(fields.items()))


@functools.cache
def _model(**overrides) -> decode.Model:
    fields = dict(
        vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
        max_position_embeddings=8, dtype="float32", attention_impl="xla", init_std=0.3,
    )  # fmt: skip
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh(
        sharding.MeshConfig(shape=tuple((a, 1) for a in sharding.MESH_AXES)), jax.devices()[:1]
    )
    return decode.Model(config=cfg, params=params, mesh=mesh)


@functools.cache
def _reference_fn(cfg):
    return jax.jit(lambda params, tokens: runner._decoder(cfg, params)(tokens))


def _reference(model, ids) -> np.ndarray:
    """Logits [T, V] of a fresh full forward over ids."""
    return np.asarray(_reference_fn(model.config)(model.params, jnp.asarray([ids], jnp.int32)))[0]


def _cached_logits(model, prompt, steps, *, chunk=0, rope_decode="hf", cache="full", fresh=False,
                   **kw):  # fmt: skip
    """Prefills (one pass or chunks; fresh: the first piece attends to itself alone), then feeds
    the greedy tokens one by one. -> (tokens, logits [steps, V] each predicting the next token)."""
    caches = decode.init_cache(model, 1, capacity=32, cache=cache, rope_decode=rope_decode, **kw)
    piece = chunk or len(prompt)
    padded = -(-len(prompt) // piece) * piece
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, : len(prompt)] = prompt
    positions = np.arange(padded, dtype=np.int32)[None]
    for start in range(0, padded, piece):
        sl = slice(start, start + piece)
        logits, caches = decode.prefill(
            model, caches, tokens[:, sl], positions[:, sl], positions[:, sl] < len(prompt),
            fresh=fresh and start == 0,
        )  # fmt: skip
        if start <= len(prompt) - 1 < start + piece:
            last = np.asarray(logits[0, len(prompt) - 1 - start])
    ids, out = list(prompt), [last]
    for _ in range(steps - 1):
        ids.append(int(out[-1].argmax()))
        logits, caches = decode.decode_step(model, caches, [ids[-1]], [len(ids) - 1])
        out.append(np.asarray(logits[0]))
    ids.append(int(out[-1].argmax()))
    return ids, np.stack(out), caches


def _assert_close(ours, ref):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


VARIANTS = {
    "G+L+C": dict(MASKS),
    "G+L+C-unscanned": dict(MASKS, scan_layers=False),
    "alibi+nope": dict(MASKS, alibi=True, rope=_rope(rope_type="nope")),
    "blockwise": dict(MASKS, attention_impl="blockwise"),  # the long-context kernel
}


@pytest.mark.parametrize(
    "variant, chunk, fresh",
    [("G+L+C", 0, False), ("G+L+C", 0, True), ("G+L+C", 3, False), ("G+L+C", 3, True),
     ("G+L+C-unscanned", 3, False), ("alibi+nope", 3, True), ("blockwise", 3, False)],
    ids=["one-shot", "one-shot-fresh", "chunked", "chunked-fresh-first", "unscanned-chunked",
         "alibi+nope-chunked-fresh", "blockwise-chunked"],
)  # fmt: skip
def test_cached_decode_equals_full_forward(variant, chunk, fresh):
    """fresh: the first prompt piece attends to itself alone (the path that lets cuDNN run a
    prefill); windows shorter than the prompt keep their ring semantics."""
    model = _model(**VARIANTS[variant])
    ids, logits, _ = _cached_logits(model, PROMPT, STEPS, chunk=chunk, fresh=fresh)
    ref = _reference(model, ids)
    _assert_close(logits, ref[len(PROMPT) - 1 : -1])


# Static rope types, two per model: local layers (window longer than any sequence here) and
# global ones.
ROPE_PAIRS = {
    "default+linear": (_rope(rope_type="default", rope_theta=1e4),
                       _rope(rope_type="linear", rope_theta=1e4, factor=2.0)),
    "yarn+llama3": (
        _rope(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=8),
        _rope(rope_type="llama3", rope_theta=1e4, factor=4.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=8),
    ),
    "ntk+proportional": (
        _rope(rope_type="ntk", rope_theta=1e4, factor=2.0),
        _rope(rope_type="proportional", rope_theta=1e4, partial_rotary_factor=0.5),
    ),
}  # fmt: skip
LENGTH_DEPENDENT = {
    "dynamic": _rope(rope_type="dynamic", rope_theta=1e4, factor=2.0),
    "dynamic_yarn": _rope(
        rope_type="dynamic_yarn", rope_theta=1e4, original_max_position_embeddings=8
    ),
    "longrope": _rope(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=8,
                      short_factor=(1.0, 1.2, 1.5, 2.0), long_factor=(3.0, 5.0, 7.0, 9.0),
                      factor=4.0),
}  # fmt: skip


@pytest.mark.parametrize("pair", ROPE_PAIRS)
def test_static_rope_types_decode_exactly(pair):
    rope, local_rope = ROPE_PAIRS[pair]
    model = _model(rope=rope, local_rope=local_rope, layer_pattern="LG", window=64, n_layers=2)
    ids, logits, _ = _cached_logits(model, PROMPT[:6], 4, chunk=1)  # crosses the trained 8
    _assert_close(logits, _reference(model, ids)[5:-1])


@pytest.mark.parametrize("rope_type", LENGTH_DEPENDENT)
def test_consistent_rope_decode_equals_a_forward_at_each_length(rope_type):
    """rope_decode="consistent" rotates every cached key with the current length's frequencies.
    One layer: each step equals a fresh forward of exactly that length. (Deeper layers' keys
    and values come from hidden states computed at earlier lengths: see README, Decoding.)"""
    model = _model(rope=LENGTH_DEPENDENT[rope_type], layer_pattern="G", n_layers=1)
    prompt = PROMPT[:7]
    ids, logits, _ = _cached_logits(model, prompt, 3, chunk=1, rope_decode="consistent")
    for i in range(3):  # lengths 7, 8 (the original) and 9
        _assert_close(logits[i], _reference(model, ids[: len(prompt) + i])[-1])
    if rope_type != "dynamic":
        return
    # "hf": the keys keep the rotation they were written with; past the original length the
    # step no longer equals the forward, but the tokens before it are untouched.
    _, hf_logits, _ = _cached_logits(model, prompt, 3, chunk=1)
    _assert_close(hf_logits[:2], logits[:2])
    assert not np.allclose(hf_logits[2], logits[2], atol=1e-4)


def test_ring_holds_each_readable_position_once():
    """Chunked prefill through a ring: after every prefix length the L and C caches hold the
    sinks and the newest positions, each once; nothing is dropped or duplicated."""
    model = _model(**MASKS)
    for chunk in (3, 7):
        _, _, caches = _cached_logits(model, PROMPT, 6, chunk=chunk)
        total = len(PROMPT) + 5  # positions 0 .. total - 1 written
        local, chunked, glob = (np.asarray(c.pos[0, 0]) for c in caches)  # repeat 0, row 0
        assert sorted(local) == [0, 1, *range(total - 6, total)]
        chunk_start = (total - 1) // 6 * 6
        assert set(range(chunk_start, total)) <= set(chunked) and len(set(chunked)) == 8
        assert sorted(glob[glob >= 0]) == list(range(total))


def test_mixed_pattern_allocates_what_the_mask_reads():
    model = _model(**MASKS)
    caches = decode.init_cache(model, 2, capacity=32)
    assert [c.k.shape for c in caches] == [(1, 2, 8, 2, 8), (1, 2, 8, 2, 8), (1, 2, 32, 2, 8)]
    streaming = decode.init_cache(model, 2, capacity=32, cache="streaming", sinks=2, window=5)
    assert [c.slots for c in streaming] == [8, 8, 7]
    assert decode.cache_bytes(caches) == 2 * (8 + 8 + 32) * (2 * 2 * 8 * 4 + 4)


def test_generate_batches_prompts_of_different_lengths():
    model = _model(**MASKS)
    prompts = [PROMPT[2:9], PROMPT]
    out = decode.generate(model, prompts, max_new_tokens=STEPS, return_logprobs=True)
    # One right-padded forward for all rows: causal, so padding changes no earlier logit.
    rows = [
        prompt + new + [0] * (len(PROMPT) - len(prompt))
        for prompt, new in zip(prompts, out.new_ids, strict=True)
    ]
    refs = np.asarray(_reference_fn(model.config)(model.params, jnp.asarray(rows, jnp.int32)))
    for prompt, new, logprobs, ref in zip(prompts, out.new_ids, out.logprobs, refs, strict=True):
        ref = ref[len(prompt) - 1 : len(prompt) + len(new) - 1]
        assert new == ref.argmax(-1).tolist()
        ref_lp = np.take_along_axis(jax.nn.log_softmax(ref), np.asarray(new)[:, None], 1)[:, 0]
        _assert_close(logprobs, ref_lp)
    chunked = decode.generate(model, prompts, max_new_tokens=STEPS, prefill_chunk=4)
    assert chunked.new_ids == out.new_ids


def test_stops_at_eos_per_row_unless_ignored():
    model = _model(**MASKS)
    prompts = [PROMPT, PROMPT[:4]]
    full = decode.generate(model, prompts, max_new_tokens=6).new_ids
    eos = full[0][2]
    out = decode.generate(model, prompts, max_new_tokens=6, eos_id=eos).new_ids
    for row, new in zip(full, out, strict=True):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert new == row[:cut]
    assert (
        decode.generate(model, prompts, max_new_tokens=6, eos_id=eos, ignore_eos=True).new_ids
        == full
    )


def test_one_compilation_per_bucket():
    model = _model(**MASKS)
    decode.generate(model, [PROMPT[:5], PROMPT], max_new_tokens=3)
    sizes = (runner.prefill_chunk._cache_size(), runner.decode_loop._cache_size())
    # Other prompt lengths and budgets within the same buckets (prompt 9-10, capacity 16).
    for prompt, steps in ((PROMPT[:9], 5), (PROMPT[1:], 4), (PROMPT[:9], 2)):
        decode.generate(model, [prompt, PROMPT[:4]], max_new_tokens=steps)
    assert (runner.prefill_chunk._cache_size(), runner.decode_loop._cache_size()) == sizes


def test_sampling_is_reproducible_per_row():
    model = _model(**MASKS)
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
    both = decode.generate(model, [PROMPT, PROMPT[:4]], seed=[7, 3], **kw).new_ids
    assert decode.generate(model, [PROMPT[:4]], seed=[3], **kw).new_ids == both[1:]
    assert decode.generate(model, [PROMPT, PROMPT[:4]], seed=[7, 3], **kw).new_ids == both
    assert decode.generate(model, [PROMPT, PROMPT[:4]], seed=[8, 3], **kw).new_ids[0] != both[0]


def test_top_k_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]]))
    kept = np.isfinite(filter_logits(logits, temperature=1.0, top_k=0, top_p=0.75))
    assert kept.tolist() == [[True, False, True, False], [False, True, True, True]]
    kept = np.isfinite(filter_logits(logits, temperature=1.0, top_k=2, top_p=1.0))
    assert kept.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_streaming_positions_live_inside_the_cache():
    """Each token sees the sinks and the window, with positions 0 .. sinks + window - 1: the loss
    of the last token equals a fresh forward over exactly those tokens (one layer: deeper
    layers' cached keys were computed when those tokens saw other context, as in StreamingLLM)."""
    model = _model(n_layers=1)
    stream = [int(t) for t in np.random.default_rng(0).integers(0, 64, 30)]
    sinks, window = 2, 6
    losses = decode.score_stream(model, stream, sinks=sinks, window=window)
    full = decode.score_stream(model, stream, cache="full")
    ref = _reference(model, stream)
    ref_losses = -np.take_along_axis(
        jax.nn.log_softmax(ref[:-1]), np.asarray(stream[1:])[:, None], 1
    )[:, 0]
    _assert_close(full, ref_losses)
    _assert_close(losses[: sinks + window - 1], ref_losses[: sinks + window - 1])
    seen = stream[:sinks] + stream[-1 - window : -1]
    last = _reference(model, seen)[-1]
    _assert_close(losses[-1], -jax.nn.log_softmax(last)[stream[-1]])


def _mesh(devices, **shape):
    sizes = tuple((a, shape.get(a, 1)) for a in sharding.MESH_AXES)
    return sharding.make_mesh(sharding.MeshConfig(shape=sizes), devices)


def _on_mesh(model, mesh, rules):
    cfg = model.config
    _, abstract, _ = build_model(cfg, mesh, rules, seed=0)
    params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), model.params, abstract)
    return decode.Model(config=cfg, params=params, mesh=mesh, rules=rules)


def test_sharded_caches_give_the_same_tokens():
    model = _model(**MASKS)
    prompts = [PROMPT, PROMPT[:5]]
    single = decode.generate(model, prompts, max_new_tokens=STEPS).new_ids
    devices = jax.devices()
    data_tensor = _on_mesh(model, _mesh(devices[:4], data=2, tensor=2), sharding.DEFAULT_RULES)
    caches = decode.init_cache(data_tensor, 2, capacity=32)
    assert caches[2].k.sharding.spec[1:4] == ("data", None, "tensor")  # size-1 axes dropped
    assert decode.generate(data_tensor, prompts, max_new_tokens=STEPS).new_ids == single
    # The cache length over 8 devices (activations unsharded in length).
    rules = tuple((n, () if n == "length" else a) for n, a in sharding.DEFAULT_RULES)
    seq = _on_mesh(model, _mesh(devices, sequence=8), rules)
    caches = decode.init_cache(seq, 1, capacity=32)
    assert all(c.k.sharding.spec[2] == "sequence" for c in caches)
    assert decode.generate(seq, prompts, max_new_tokens=STEPS).new_ids == single


@pytest.mark.parametrize(
    "prompts, kw, message",
    [
        ([[]], {}, "prompt 0 is empty"),
        ([[1, 2], [3, 64]], {}, "token id 64 outside the vocabulary"),
        ([[1, -1]], {}, "token id -1 outside"),
        ([PROMPT], dict(capacity=12), "set capacity >= 15"),
        ("hello", {}, "list of token-id lists"),
        ([PROMPT], dict(cache="ring"), "cache='ring'"),
        ([PROMPT], dict(rope_decode="exact"), "rope_decode='exact'"),
    ],
)
def test_bad_input_is_one_clear_error(prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        decode.generate(_model(**MASKS), prompts, max_new_tokens=5, **kw)
