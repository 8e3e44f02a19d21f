"""Synthetic tasks, mixtures and PoSE positions: layouts, disjoint train/eval draws, scoring."""

import numpy as np
import pytest

from ctxext_jax.data import ByteTokenizer, DataConfig, eval_batches, global_train_iterator, tasks
from ctxext_jax.data.pose import PoseConfig, pose_positions

TOK = ByteTokenizer()
CFG = tasks.TaskConfig(facts=4, value_len=3, hops=2)
VOCAB = tasks.TaskVocab.for_tokenizer(TOK)
RNG = np.random.default_rng()


def _instances(task, length, *, depths=(0.0, 0.5, 1.0), trials=3, seed=0, haystack=None):
    return tasks.eval_instances(
        task, CFG, VOCAB, length=length, depths=depths, trials=trials, seed=seed,
        haystack=haystack, bos=TOK.bos_id, vocab_size=TOK.vocab_size,
    )  # fmt: skip


def _oracle_answer(tokens, spans, span_index):
    """Independent solver: a key's definition is its first occurrence (kv: the only one;
    vartrack: facts come in hop order, so a variable is defined before it is referenced);
    the token after it is its value, or another variable to follow."""
    start, _ = spans[span_index]
    key, keys = int(tokens[start - 1]), set(VOCAB.keys.tolist())
    while True:
        at = int(np.flatnonzero(tokens == key)[0])
        if int(tokens[at + 1]) not in keys:
            return int(tokens[at + 1])
        key = int(tokens[at + 1])


@pytest.mark.parametrize("task", tasks.TASKS)
def test_instances_are_exact_and_answerable(task):
    haystack = RNG.integers(3, 100, 5000).astype(np.int32)
    length = tasks.min_length(task, CFG) + int(RNG.integers(0, 200))
    for instance in _instances(task, length, haystack=haystack):
        tokens = instance.tokens
        assert len(tokens) == length and tokens[0] == TOK.bos_id
        reserved = np.isin(tokens, VOCAB.reserved)
        # Only facts, markers and answers are task symbols; the filler never is (textcopy:
        # its run and answers are ordinary tokens, only the ASK marker is a symbol).
        n_symbols = 1 if task == "textcopy" else tasks.min_length(task, CFG) - 1
        assert reserved.sum() == n_symbols
        answer_tokens = VOCAB.values if task != "textcopy" else np.arange(3, 100)
        mask = instance.target_mask()
        assert mask.sum() == sum(e - s for s, e in instance.answer_spans)
        for i, (s, e) in enumerate(instance.answer_spans):
            assert e <= length and np.isin(tokens[s:e], answer_tokens).all()
            if e - s == 1:
                assert int(tokens[s]) == _oracle_answer(tokens, instance.answer_spans, i)
            else:  # multi-token values: the same run of values precedes the question
                runs = [tokens[j : j + e - s] for j in range(1, s - (e - s))]
                assert any(np.array_equal(r, tokens[s:e]) for r in runs)


def test_depth_places_the_facts():
    length = 200
    first = {}
    for instance in _instances("kv", length, depths=(0.0, 1.0), trials=1):
        symbols = np.flatnonzero(np.isin(instance.tokens, VOCAB.reserved))
        first[instance.depth] = symbols[0]
    assert first[0.0] == 1  # right after bos
    assert first[1.0] == length - 2 * CFG.facts - 1 - 2 * CFG.facts  # just before the questions


def test_train_and_eval_draws_are_disjoint():
    train = tasks.TaskSource("passkey", CFG, TOK, seq_len=64, seed=0, haystack=None)
    held_out = tasks.TaskSource("passkey", CFG, TOK, seq_len=64, seed=0, haystack=None,
                                evaluation=True)  # fmt: skip

    def value(piece):
        return tuple(piece["targets"][piece["loss_mask"] > 0])

    train_keys = {value(train(i)) for i in range(300)}
    eval_keys = {value(held_out(i)) for i in range(100)}
    grid_keys = {tuple(i.tokens[-3:]) for i in _instances("passkey", 40, trials=30)}
    assert not train_keys & (eval_keys | grid_keys)
    assert len(train_keys) == 300  # and no repeats inside a stream
    # Same index, same seed: the same instance (workers rebuild instances by index).
    np.testing.assert_array_equal(train(7)["inputs"], train(7)["inputs"])


def test_score_instances_against_an_oracle():
    instances = _instances("vartrack", 80) + _instances("kv", 80)
    # A scorer that is right exactly where `flip` says so.
    flip = RNG.random((len(instances), 80)) < 0.9

    def scorer(inputs, targets):
        return np.zeros(inputs.shape, np.float32), flip[: len(inputs)]

    got = tasks.score_instances(scorer, instances, pad_id=TOK.pad_id, batch_tokens=10_000)
    for n, instance in enumerate(instances):
        for i, (s, e) in enumerate(instance.answer_spans):
            assert got[n, i] == flip[n, s - 1 : e - 1].all()


def test_mixture_stream_and_per_source_masks(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(RNG.choice(["ab", "cd", "ef"], 80)))
    cfg = DataConfig.from_config(
        {"dataset": "files", "files": str(tmp_path / "*.txt"), "mixture": {"text": 1, "kv": 1},
         "task": {"facts": 4}, "seq_len": 48, "eval_split": "train"}
    )  # fmt: skip
    assert cfg.source_names == ("kv", "text")
    it = global_train_iterator(cfg, global_batch_size=4, seq_len=48, seed=0)
    batches = [next(it) for _ in range(12)]
    # Read as streams: two processes' rows together are the one-process batch.
    halves = [global_train_iterator(cfg, global_batch_size=4, seq_len=48, seed=0,
                                    process_index=p, process_count=2) for p in (0, 1)]  # fmt: skip
    for b in batches[:2]:
        parts = [next(h) for h in halves]
        for key in b:
            np.testing.assert_array_equal(b[key], np.concatenate([p[key] for p in parts]))
    ids = np.concatenate([b["source_ids"][b["segment_ids"] > 0] for b in batches])
    assert 0.2 < np.mean(ids == 0) < 0.8
    for b in batches:
        text = (b["source_ids"] == 1) & (b["segment_ids"] > 0)
        kv = (b["source_ids"] == 0) & (b["segment_ids"] > 0)
        assert (b["loss_mask"][text] == 1).all()
        assert set(np.unique(b["targets"][kv & (b["loss_mask"] > 0)])) <= set(VOCAB.values)
    first = list(eval_batches(cfg, batch_size=4, seq_len=48, max_batches=2))
    again = list(eval_batches(cfg, batch_size=4, seq_len=48, max_batches=2))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    with pytest.raises(ValueError, match="unknown source 'bogus'"):
        DataConfig.from_config({"mixture": {"bogus": 1.0}})
    with pytest.raises(ValueError, match="raise data.task.values"):  # copy: 2 x facts values
        tasks.make_instance("copy", tasks.TaskConfig(facts=40), VOCAB, RNG, length=200,
                            depth=0.0, side=0, haystack=None, bos=TOK.bos_id,
                            vocab_size=TOK.vocab_size)  # fmt: skip


def test_pose_positions_skip_within_the_target():
    segment_ids = np.repeat([1, 2, 3, 0], [30, 20, 10, 4]).astype(np.int32)
    positions = np.concatenate([np.arange(30), np.arange(20), np.arange(10), np.zeros(4)])
    spans = []
    for _ in range(50):
        new = pose_positions(positions, segment_ids, RNG, target_length=256, chunks=2)
        np.testing.assert_array_equal(new[segment_ids == 0], 0)
        for seg in (1, 2, 3):
            p = new[segment_ids == seg]
            steps = np.diff(p)
            assert p.min() >= 0 and p.max() < 256 and (steps >= 1).all()
            assert (steps > 1).sum() <= 1  # two chunks: at most one skip inside
            spans.append(p.max())
    assert max(spans) > 200  # the skips reach far beyond the 30-token pieces
    with pytest.raises(ValueError, match="target_length"):
        PoseConfig(target_length=16).check(64)


@pytest.mark.parametrize("facts", [1, 2, 3, 4, 5, 6, 7, 8])
def test_rows_of_the_shortest_length_hold_instances_without_filler(facts):
    """seq_len = shortest - 1 (a filler-free curriculum stage): every instance is the shortest
    one, even where exp(log(n)) rounds to just under n (it did for n = 18)."""
    cfg = tasks.TaskConfig(facts=facts, keys=64, values=64, filler="random")
    shortest = tasks.min_length("kv", cfg)
    source = tasks.TaskSource("kv", cfg, TOK, seq_len=shortest - 1, seed=0, haystack=None)
    for index in range(50):
        assert len(source(index)["inputs"]) == shortest - 1
