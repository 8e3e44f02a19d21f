"""Long-context evaluation parts: window plans, sliding perplexity, prompt generators, scoring."""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from ctxext_jax.data import ByteTokenizer, HFTokenizer
from ctxext_jax.evals import EvalOptions
from ctxext_jax.evals.perplexity import resolve_stride, sliding_perplexity, window_plan
from ctxext_jax.evals.retrieval import (
    NEEDLE_QUESTION,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    needle_grid,
    needle_prompts,
    passkey_grid,
    passkey_prompt,
)
from ctxext_jax.evals.scoring import make_scorer


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json trained on the templates (merges make token
    boundaries differ from bytes, which is what the exactness checks need)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, NEEDLE_QUESTION] * 20
    corpus += [" The grass is green. The sky is blue. 12345 67890 apple river"] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(str(path))


@pytest.fixture(params=["bytes", "hf"])
def tokenizer(request, hf_tokenizer):
    return ByteTokenizer() if request.param == "bytes" else hf_tokenizer


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize(
    "n, length, stride", [(1000, 128, 64), (1000, 128, 128), (1001, 100, 37), (257, 256, 1),
                          (300, 300, 300), (999, 64, 63)]
)  # fmt: skip
def test_window_plan_scores_every_target_once(n, length, stride):
    plan = window_plan(n, length=length, stride=stride)
    counts = np.zeros(n, int)
    for begin, first in plan:
        assert 0 <= begin and begin + length <= n and 0 <= first < length
        counts[begin + first : begin + length] += 1
    np.testing.assert_array_equal(counts, 1)
    # Scored tokens have at least length - stride tokens of context after the first window.
    assert all(first >= length - stride for _, first in plan[1:-1])


def test_window_plan_rejects_bad_stride_and_short_text():
    with pytest.raises(ValueError, match="stride"):
        window_plan(100, length=10, stride=11)
    with pytest.raises(ValueError, match="ppl_tokens"):
        window_plan(50, length=64, stride=32)
    with pytest.raises(ValueError, match="stride"):
        resolve_stride(1.5, 64)
    assert resolve_stride(0.5, 64) == 32 and resolve_stride(16, 64) == 16


def _apply_zero_logits(vocab):
    return lambda params, tokens: jnp.zeros((*tokens.shape, vocab), jnp.float32)


@pytest.mark.parametrize("length, stride", [(64, 32), (64, 64), (50, 17)])
def test_uniform_logits_give_log_vocab(length, stride):
    vocab, rng = 37, np.random.default_rng(0)
    stream = rng.integers(0, vocab, size=1000).astype(np.int32)
    scorer = make_scorer(_apply_zero_logits(vocab), None)
    out = sliding_perplexity(scorer, stream, length=length, stride=stride, batch_tokens=200)
    assert out["tokens"] == len(stream) - 1
    assert out["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert out["ppl"] == pytest.approx(vocab, rel=1e-5)
    np.testing.assert_allclose(out["position_loss"]["loss"], math.log(vocab), rtol=1e-6)


def test_sliding_perplexity_matches_direct_bigram_loss():
    """A context-free bigram model: the windowed mean must equal the plain mean over targets."""
    vocab, rng = 23, np.random.default_rng(1)
    table = rng.normal(size=(vocab, vocab)).astype(np.float32)
    stream = rng.integers(0, vocab, size=777).astype(np.int32)
    scorer = make_scorer(lambda p, tokens: jnp.asarray(table)[tokens], None)
    out = sliding_perplexity(scorer, stream, length=96, stride=40, batch_tokens=300)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    reference = -logp[stream[:-1], stream[1:]].mean()
    assert out["loss"] == pytest.approx(reference, rel=1e-5)


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("length", [300, 517, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_is_token_exact(tokenizer, length, depth):
    key = 48213
    prompt = passkey_prompt(tokenizer, length=length, depth=depth, key=key)
    assert prompt.tokens.shape == (length,) and prompt.tokens.dtype == np.int32
    needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
    ((start, end),) = prompt.inserts
    assert end - start == len(needle)
    np.testing.assert_array_equal(prompt.tokens[start:end], needle)
    head = 1 + len(tokenizer.encode(PASSKEY_INTRO))
    assert start - head == round(depth * prompt.filler)
    question = tokenizer.encode(PASSKEY_QUESTION)
    np.testing.assert_array_equal(prompt.tokens[-len(question) :], question)
    assert prompt.tokens[0] == tokenizer.bos_id
    assert tokenizer.decode(prompt.answers[0]).strip() == str(key)
    assert length == head + prompt.filler + len(needle) + len(question)


def test_passkey_prompt_too_short_raises():
    with pytest.raises(ValueError, match="shorter than"):
        passkey_prompt(ByteTokenizer(), length=100, depth=0.5, key=12345)


@pytest.mark.parametrize("variant, rows", [("single", 1), ("multi", 3), ("distractor", 1)])
@pytest.mark.parametrize("depth", [0.0, 0.6, 1.0])
def test_needle_prompts_place_needles_at_depth(tokenizer, variant, rows, depth):
    rng = np.random.default_rng(3)
    haystack = np.asarray(tokenizer.encode("lorem ipsum dolor sit amet. " * 40), np.int32)
    length = 400
    prompts = needle_prompts(tokenizer, haystack, length=length, depth=depth, variant=variant,
                             needles=3, rng=rng)  # fmt: skip
    assert len(prompts) == rows
    for prompt in prompts:
        assert prompt.tokens.shape == (length,)
        spans = prompt.inserts
        assert len(spans) == (1 if variant == "single" else 3)
        texts = [tokenizer.decode(prompt.tokens[a:b]) for a, b in spans]
        target_start = spans[0][0]
        inserted_before = sum(b - a for a, b in spans if a < target_start)
        assert target_start - 1 - inserted_before == round(depth * prompt.filler)
        target = re.fullmatch(r" The special magic number for (\w+) is (\d+)\.", texts[0])
        assert target, texts[0]
        if variant == "distractor":
            for text in texts[1:]:
                assert f"magic code for {target.group(1)} is" in text
            values = [re.search(r"(\d+)\.$", t).group(1) for t in texts]
            assert [tokenizer.decode(a).strip() for a in prompt.answers] == values
    if variant == "multi":
        asked = [tokenizer.decode(p.answers[0]).strip() for p in prompts]
        assert asked == [re.search(r"(\d+)\.$", tokenizer.decode(prompts[0].tokens[a:b])).group(1)
                         for a, b in prompts[0].inserts]  # fmt: skip


# ----------------------------------------------------------------------------- scoring
def _induction_scorer(n: int):
    """Predicts the token that followed the latest earlier occurrence of the last n tokens:
    a model that retrieves perfectly when the context before the answer is unique."""

    def score(inputs, targets):
        correct = np.zeros(inputs.shape, bool)
        for r, row in enumerate(inputs):
            seen = {}
            for t in range(len(row)):
                if t >= n:
                    seen[tuple(row[t - n : t])] = row[t]
                guess = seen.get(tuple(row[t - n + 1 : t + 1]), -1) if t >= n - 1 else -1
                correct[r, t] = guess == targets[r, t]
        return np.zeros(inputs.shape, np.float32), correct

    return score


def test_passkey_scoring_is_greedy_exact_match(tokenizer):
    # Enough context to tell the needle's "pass key is" from the filler's "sky is".
    n = 8 if isinstance(tokenizer, ByteTokenizer) else 3
    grid = passkey_grid(_induction_scorer(n), tokenizer, lengths=[300, 600], depths=[0, 0.5, 1],
                        trials=2, seed=0, batch_tokens=2000)  # fmt: skip
    assert grid["accuracy"] == [[1.0] * 3] * 2
    # A model that never completes the key scores zero.
    blind = lambda i, t: (np.zeros(i.shape, np.float32), np.zeros(i.shape, bool))  # noqa: E731
    grid = passkey_grid(blind, tokenizer, lengths=[300], depths=[0.5], trials=2, seed=0,
                        batch_tokens=2000)  # fmt: skip
    assert grid["accuracy"] == [[0.0]]


def test_needle_grid_with_retrieving_model():
    tokenizer = ByteTokenizer()
    haystack = np.asarray(tokenizer.encode("x = [i for i in range(10)]\n" * 30), np.int32)
    for variant in ("single", "multi", "distractor"):
        grid = needle_grid(_induction_scorer(20), tokenizer, haystack, lengths=[400],
                           depths=[0.0, 1.0], trials=2, variant=variant, needles=3, seed=0,
                           batch_tokens=4000)  # fmt: skip
        assert grid["accuracy"] == [[1.0, 1.0]], variant
        if variant == "distractor":
            assert grid["distractor_rate"] == [[0.0, 0.0]]


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="metrics"):
        EvalOptions(lengths=(64,), metrics=("bleu",))
    with pytest.raises(ValueError, match="depths"):
        EvalOptions(lengths=(64,), depths=(1.5,))
    with pytest.raises(ValueError, match="needle_variants"):
        EvalOptions(lengths=(64,), needle_variants=("triple",))
    with pytest.raises(ValueError, match=r"--needles=21 must be in \[1, 20\]"):
        EvalOptions(lengths=(64,), needles=21)


def test_suite_length_check_counts_the_needles_of_the_variants_asked_for(tmp_path):
    """A single-needle prompt fits lengths that multi / distractor prompts (3 needles) do not."""
    from ctxext_jax.data import DataConfig
    from ctxext_jax.evals.retrieval import needle_min_length
    from ctxext_jax.evals.suite import run_suite

    tokenizer = ByteTokenizer()
    one, three = needle_min_length(tokenizer, needles=1), needle_min_length(tokenizer, needles=3)
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 50)
    data_cfg = DataConfig(dataset="files", files=str(tmp_path / "*.txt"), eval_split="train")
    scorer_for = lambda length: make_scorer(_apply_zero_logits(tokenizer.vocab_size), None)  # noqa: E731
    options = dict(lengths=(one,), metrics=("needle",), depths=(0.5,), needle_trials=1, needles=3)
    results = run_suite(
        scorer_for,
        tokenizer,
        data_cfg,
        EvalOptions(needle_variants=("single",), **options),
        progress=False,
    )
    assert results["needle"]["single"]["accuracy"] == [[0.0]]
    with pytest.raises(ValueError, match=f"use lengths >= {three}"):
        run_suite(scorer_for, tokenizer, data_cfg, EvalOptions(**options), progress=False)
