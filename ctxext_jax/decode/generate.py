"""Generation and stream scoring over the KV caches.

`generate` right-pads a batch of prompts of different lengths (each row keeps positions
0 .. len-1), prefills them in one pass or in `prefill_chunk` pieces, then samples with one
compiled step inside a `lax.while_loop`. Shapes are bucketed (batch, prompt length, cache
capacity, output buffer), so prompts of other lengths within a bucket reuse the compilation.

`init_cache`, `prefill`, `decode_step` are the pieces for callers that drive the cache
themselves; `score_stream` scores a long token stream chunk by chunk through the cache
(StreamingLLM's perplexity with cache="streaming").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctxext_jax import sharding
from ctxext_jax.decode import runner
from ctxext_jax.decode.cache import ROPE_DECODE_MODES, CacheMode
from ctxext_jax.decode.sampling import Sampling

CACHE_KINDS = ("full", "streaming")


def bucket(n: int, *, minimum: int = 16) -> int:
    """The smallest of 2^k, 1.25 * 2^k, 1.5 * 2^k, 1.75 * 2^k (>= minimum) holding n: shapes that
    vary within a bucket share one compilation, at most 25% of padding."""
    n = max(int(n), minimum)
    power = 2 ** max(int(math.floor(math.log2(n))) - 2, 0)
    return -(-n // power) * power


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """new_ids: the tokens generated per prompt, up to and including the eos that stopped the
    row (ignore_eos=False); logprobs: each one's log-probability under the model (before
    temperature / top-k / top-p), or None."""

    new_ids: list[list[int]]
    logprobs: list[list[float]] | None = None


def cache_mode(
    model: runner.Model,
    *,
    cache: str,
    rope_decode: str,
    capacity: int,
    sinks: int | None,
    window: int | None,
) -> CacheMode:
    """Checks the cache options -> the static CacheMode (streaming: sinks default 4, window
    default max_position_embeddings - sinks, so every position stays in the trained range)."""
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache={cache!r}: choose one of {CACHE_KINDS}.")
    if rope_decode not in ROPE_DECODE_MODES:
        raise ValueError(f"rope_decode={rope_decode!r}: choose one of {ROPE_DECODE_MODES}.")
    if cache == "full":
        return CacheMode(capacity=capacity, rope_decode=rope_decode)
    sinks = 4 if sinks is None else int(sinks)
    if sinks < 0:
        raise ValueError(f"sinks={sinks}: the number of attention-sink tokens must be >= 0.")
    if window is None:
        window = model.config.max_position_embeddings - sinks
    if int(window) < 1:
        raise ValueError(
            f"window={window}: the streaming window must be >= 1 token (default "
            "max_position_embeddings - sinks)."
        )
    return CacheMode(
        capacity=capacity,
        rope_decode=rope_decode,
        streaming=True,
        stream_sinks=sinks,
        stream_window=int(window),
    )


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            "prompts must be a non-empty list of token-id lists, e.g. [[1, 2, 3]]; tokenize "
            "text first."
        )
    out = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"prompt {i} must be a flat list of int token ids, got {prompt!r:.80}."
            )
        if ids.size == 0:
            raise ValueError(
                f"prompt {i} is empty; give at least one token id (e.g. the tokenizer's BOS id)."
            )
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"prompt {i} holds token id {int(bad[0])} outside the vocabulary [0, {vocab_size})"
                "; was it tokenized with another model's tokenizer?"
            )
        out.append([int(t) for t in ids])
    return out


def _batch_size(rows: int, model: runner.Model) -> int:
    """Rows padded to a power of two times the number of batch shards of the cache."""
    sizes = dict(zip(model.mesh.axis_names, model.mesh.devices.shape, strict=True))
    shards = sharding.logical_size("cache_batch", model.rules, sizes)
    per_shard = -(-rows // shards)
    return shards * 2 ** math.ceil(math.log2(per_shard))


def _has_global_cache(cfg, mode: CacheMode) -> bool:
    return not mode.streaming and "global" in cfg.layer_kinds


def init_cache(
    model,
    batch: int,
    *,
    capacity: int,
    cache: str = "full",
    rope_decode: str = "hf",
    sinks: int | None = None,
    window: int | None = None,
):
    """Empty KV caches for `batch` rows (G layers hold `capacity` positions), sharded by the
    model's rules; a list of `LayerCache` in the model's layer layout."""
    model = runner.as_model(model)
    mode = cache_mode(
        model, cache=cache, rope_decode=rope_decode, capacity=capacity, sinks=sinks, window=window
    )
    return runner.init_cache_arrays(model, mode, batch)


def _statics(model: runner.Model) -> dict:
    return dict(cfg=model.config, mesh=model.mesh, rules=model.rules)


def prefill(model, caches, tokens, positions, valid=None, *, fresh=False):
    """Runs tokens [B, T] at absolute positions [B, T] (valid [B, T] bool: False = padding)
    through the caches. -> (float32 logits [B, T, V], caches). The caches are donated.
    fresh=True promises empty caches, positions 0 .. T-1 and padding only at the end of each
    row, which lets a fused kernel run the prompt's attention (see DecodeStep)."""
    model = runner.as_model(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    return runner.forward_all(
        model.params, caches, tokens, positions, valid, fresh=fresh, **_statics(model)
    )


def decode_step(model, caches, tokens, positions):
    """One token per row: tokens, positions [B] -> (float32 logits [B, V], caches)."""
    tokens = jnp.asarray(tokens, jnp.int32)[:, None]
    positions = jnp.asarray(positions, jnp.int32)[:, None]
    logits, caches = prefill(model, caches, tokens, positions)
    return logits[:, 0], caches


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    eos_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    prefill_chunk: int = 0,
    cache: str = "full",
    rope_decode: str = "hf",
    capacity: int | None = None,
    return_logprobs: bool = False,
    sinks: int | None = None,
    window: int | None = None,
    mesh=None,
    rules=None,
) -> GenerateOutput:
    """New tokens for each prompt (lists of token ids).

    temperature 0 is greedy; top_k / top_p filter before sampling. seed: one int (row i draws
    with fold_in(key(seed), i)) or one int per prompt (row i draws with key(seed[i]), wherever
    it sits in the batch); a row's tokens never depend on the other rows. A row stops at any
    of `eos_id` (kept in its output) unless ignore_eos, or after max_new_tokens.
    prefill_chunk > 0 feeds prompts in pieces of that many tokens.
    cache="full": G layers hold `capacity` positions (default: the longest prompt plus
    max_new_tokens, bucketed); L / C layers a ring of their window / chunk (+ sinks).
    cache="streaming": every layer keeps `sinks` (default 4) + `window` (default
    max_position_embeddings - sinks) slots with positions assigned inside the cache, for
    unbounded generation. rope_decode: "hf" or "consistent" for the length-dependent rope
    types (README, Decoding). mesh / rules default to the model's.
    """
    model = runner.as_model(model, mesh=mesh, rules=rules)
    cfg = model.config
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 0:
        raise ValueError(
            f"prefill_chunk must be an int >= 0 (0 = one pass), got {prefill_chunk!r}."
        )
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    longest, needed = int(lengths.max()), int(lengths.max()) + max_new_tokens
    if capacity is None:
        capacity = bucket(needed)
    mode = cache_mode(
        model, cache=cache, rope_decode=rope_decode, capacity=int(capacity), sinks=sinks,
        window=window,
    )  # fmt: skip
    if _has_global_cache(cfg, mode) and needed > mode.capacity:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} needs "
            f"{needed} cache slots in the global (G) layers, but capacity={mode.capacity}; set "
            f"capacity >= {needed} (or leave it None), lower max_new_tokens, or use "
            "cache='streaming' for bounded memory."
        )
    if isinstance(seed, int):
        row_keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(len(prompts))]
    else:
        row_keys = [jax.random.key(int(s)) for s in seed]
    if len(row_keys) != len(prompts):
        raise ValueError(
            f"seed: give one int or one per prompt ({len(prompts)}), got {len(row_keys)}."
        )
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)

    # Right-padded batch, bucketed in rows and length.
    rows = len(prompts)
    B = _batch_size(rows, model)
    piece = prefill_chunk or bucket(longest, minimum=8)
    padded_len = -(-longest // piece) * piece
    tokens = np.zeros((B, padded_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    prompt_len = np.ones((B,), np.int32)
    prompt_len[:rows] = lengths
    keys = np.stack(
        [jax.random.key_data(k) for k in row_keys]
        + [jax.random.key_data(jax.random.key(0))] * (B - rows)
    )

    statics = _statics(model)
    caches = runner.init_cache_arrays(model, mode, B)
    last_logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    for start in range(0, padded_len, piece):
        caches, last_logits = runner.prefill_chunk(
            model.params, caches, tokens[:, start : start + piece], np.int32(start), prompt_len,
            last_logits, fresh=start == 0, **statics,
        )  # fmt: skip
    out, logprobs, count, _ = runner.decode_loop(
        model.params,
        caches,
        last_logits,
        prompt_len,
        jax.random.wrap_key_data(jnp.asarray(keys)),
        np.int32(max_new_tokens),
        np.asarray(eos or [-1], np.int32),
        np.bool_(ignore_eos),
        sampling=sampling,
        buffer=bucket(max_new_tokens, minimum=8),
        **statics,
    )
    out, logprobs, count = np.asarray(out), np.asarray(logprobs), np.asarray(count)
    new_ids = [out[i, : count[i]].tolist() for i in range(rows)]
    lps = [logprobs[i, : count[i]].tolist() for i in range(rows)] if return_logprobs else None
    return GenerateOutput(new_ids=new_ids, logprobs=lps)


def score_stream(
    model,
    ids: Sequence[int],
    *,
    cache: str = "streaming",
    chunk: int = 1,
    sinks: int | None = None,
    window: int | None = None,
    rope_decode: str = "hf",
    capacity: int | None = None,
) -> np.ndarray:
    """Per-token losses of a token stream fed through the cache `chunk` tokens at a time:
    losses[i] = -log p(ids[i + 1] | ids[: i + 1]), float32 [len(ids) - 1].

    cache="streaming" keeps bounded memory however long the stream (StreamingLLM; with chunk=1
    every token sees exactly the sinks and the window with positions inside the cache);
    cache="full" holds the whole stream (capacity defaults to its length, bucketed).
    """
    model = runner.as_model(model)
    ids = _check_prompts([ids], model.config.vocab_size)[0]
    if len(ids) < 2:
        raise ValueError("score_stream needs at least 2 tokens (one to predict).")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}.")
    capacity = capacity or bucket(len(ids))
    mode = cache_mode(
        model, cache=cache, rope_decode=rope_decode, capacity=capacity, sinks=sinks, window=window
    )
    if _has_global_cache(model.config, mode) and len(ids) > capacity:
        raise ValueError(
            f"a stream of {len(ids)} tokens needs capacity >= {len(ids)} with cache='full' "
            f"(got {capacity}); raise it or use cache='streaming'."
        )
    B = _batch_size(1, model)
    stream = np.asarray(ids, np.int32)
    caches = runner.init_cache_arrays(model, mode, B)
    losses = []
    for start in range(0, len(ids) - 1, chunk):
        count = min(chunk, len(ids) - 1 - start)
        tokens = np.zeros((B, chunk), np.int32)
        targets = np.zeros((B, chunk), np.int32)
        tokens[:, :count] = stream[start : start + count]
        targets[:, :count] = stream[start + 1 : start + 1 + count]
        caches, chunk_losses = runner.score_chunk(
            model.params, caches, tokens, targets, np.int32(start), np.int32(count),
            **_statics(model),
        )  # fmt: skip
        losses.append(np.asarray(chunk_losses[0, :count]))
    return np.concatenate(losses)
