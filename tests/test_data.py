"""Data pipeline: builders, packing, checkpointing, sharding, tokenizers, files, bad input.

Every TFDS dataset is prepared into a temporary data_dir, never into ~/tensorflow_datasets.
"""

import collections
import hashlib
import json
import os
import pickle
import platform

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from ctxext_jax.data import (
    BATCH_KEYS,
    ByteTokenizer,
    DataConfig,
    builders,
    eval_batches,
    eval_documents,
    make_tokenizer,
    train_iterator,
)
from ctxext_jax.data.pipeline import packed_rows
from ctxext_jax.data.sources import document_tokens, open_split
from ctxext_jax.data.splits import split_of

RNG = np.random.default_rng()
WORDS = "the of key value lorem ipsum dolor sit amet data río naïve 文字 🙂".split()


def random_documents(n, *, max_words=60, rng=RNG):
    """Fresh random texts of very different lengths (some far longer than seq_len), unique
    at both ends so that their first and last pieces differ from any other document's."""
    return [
        f"#{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words)))) + f" #{i}"
        for i in range(n)
    ]


def reference_pieces(texts, tokenizer, seq_len):
    """Independent reference: the (inputs, targets) pieces every document must yield."""
    pieces = []
    for text in texts:
        ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
        inputs, targets = ids[:-1], ids[1:]
        for start in range(0, len(inputs), seq_len):
            end = start + seq_len
            pieces.append((tuple(inputs[start:end]), tuple(targets[start:end])))
    return collections.Counter(pieces)


def row_pieces(row, pad_id):
    """Checks one packed row's invariants and returns its (inputs, targets) pieces."""
    seg, pos = row["segment_ids"], row["positions"]
    np.testing.assert_array_equal(row["loss_mask"], (seg > 0).astype(np.float32))
    assert np.all(row["inputs"][seg == 0] == pad_id) and np.all(row["targets"][seg == 0] == pad_id)
    pieces = []
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        assert len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        inputs, targets = row["inputs"][idx], row["targets"][idx]
        # Inside a segment each target is the next input: no target comes from another piece.
        np.testing.assert_array_equal(targets[:-1], inputs[1:])
        pieces.append((tuple(inputs.tolist()), tuple(targets.tolist())))
    return pieces


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory):
    """40 .txt documents and two .jsonl files of 30 lines each (plus a blank line)."""
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    texts = random_documents(100, max_words=200, rng=rng)
    for i, text in enumerate(texts[:40]):
        (root / "txt" / f"doc{i:02d}.txt").parent.mkdir(exist_ok=True)
        (root / "txt" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    for j in range(2):
        lines = [
            json.dumps({"text": t, "id": k}) for k, t in enumerate(texts[40 + 30 * j : 70 + 30 * j])
        ]
        (root / f"part{j}.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return root, texts


# --- the embedded dataset ---------------------------------------------------------------


def test_embedded_builder_splits_and_provenance(data_dir):
    cfg = DataConfig(dataset="embedded", data_dir=data_dir)
    train_docs, info = open_split(cfg, "train")
    val_docs, _ = open_split(cfg, "validation")
    root, paths = builders.stdlib_files()
    prov = info["provenance"]
    assert prov["python_version"] and prov["stdlib_path"] == str(root)
    assert prov["num_files"] == len(paths) and "site-packages" not in "".join(paths)
    want_hash = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    assert prov["file_list_sha256"] == want_hash and want_hash in info["description"]
    assert prov["python_version"] == platform.python_version()
    assert info["data_dir"].startswith(data_dir)
    train, val = len(train_docs), len(val_docs)
    # A few deliberately undecodable test files are dropped; everything else is a document.
    assert 0.95 * len(paths) <= train + val <= len(paths)
    assert 0.02 < val / (train + val) < 0.09
    # The split follows the path hash alone: recompute it independently.
    builder = builders.CtxextEmbedded(data_dir=data_dir, file_format="array_record")
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        got = {source[i]["path"].decode() for i in range(len(source))}
        assert all(split_of(p) == split for p in got)
    sample = next(eval_documents(cfg))
    assert isinstance(sample, str) and len(sample) > 0


# --- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_packing_exactly_once_and_no_cross_document_targets(shuffle):
    tok = ByteTokenizer()
    seq_len = 32
    texts = random_documents(80)
    rows = list(
        packed_rows(
            texts,
            tok,
            seq_len=seq_len,
            seed=int(RNG.integers(1 << 30)),
            shuffle=shuffle,
            num_epochs=1,
            num_bins=8,
        )
    )
    got = collections.Counter()
    for row in rows:
        assert all(row[k].shape == (seq_len,) for k in BATCH_KEYS)
        assert row["inputs"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
        got.update(row_pieces(row, tok.pad_id))
    assert got == reference_pieces(texts, tok, seq_len)


def test_packing_hand_made_rows():
    tok = ByteTokenizer()
    # "ab" -> [bos a b eos]: inputs [1, a, b], targets [a, b, 2].
    # "c" -> inputs [1, c], targets [c, 2].
    rows = list(
        packed_rows(["ab", "c"], tok, seq_len=8, seed=0, shuffle=False, num_epochs=1, num_bins=1)
    )
    a, b, c = (ord(ch) + 3 for ch in "abc")
    assert len(rows) == 1
    row = rows[0]
    np.testing.assert_array_equal(row["inputs"], [1, a, b, 1, c, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [a, b, 2, c, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
    # A long document: pieces of seq_len, the continuation's positions restart at 0.
    rows = list(
        packed_rows(["abcdefghij"], tok, seq_len=4, seed=0, shuffle=False, num_epochs=1, num_bins=1)
    )
    ids = [1] + [ord(ch) + 3 for ch in "abcdefghij"] + [2]
    np.testing.assert_array_equal(np.concatenate([r["inputs"] for r in rows])[:11], ids[:-1])
    np.testing.assert_array_equal(np.concatenate([r["targets"] for r in rows])[:11], ids[1:])
    assert all(
        list(r["positions"][r["segment_ids"] > 0]) == list(range((r["segment_ids"] > 0).sum()))
        for r in rows
    )


def test_epochs_are_reshuffled():
    tok = ByteTokenizer()
    texts = [f"document number {i}" for i in range(64)]  # each fills most of a 32-token row
    rows = packed_rows(texts, tok, seq_len=32, seed=3, shuffle=True, num_epochs=2, num_bins=1)
    order = [tok.decode(r["inputs"]) for r in rows]
    # Every document twice over two epochs; the second epoch is not the first one replayed
    # (the piece window may mix the epochs' edges, so compare whole orders).
    assert collections.Counter(order) == collections.Counter(texts * 2)
    assert order[:64] != order[64:] and order[:64] != texts


# --- iterator: checkpoint, sharding, eval ---------------------------------------------


def test_train_iterator_checkpoint_restore(files_dir):
    root, _ = files_dir
    cfg = DataConfig(dataset="files", files=str(root / "**" / "*.*"))
    kwargs = dict(global_batch_size=4, seq_len=24, seed=7, shard_index=0, shard_count=1)
    it = train_iterator(cfg, **kwargs)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))  # what grain's CheckpointHandler stores
    expected = [next(it) for _ in range(40)]  # runs past an epoch of this small corpus
    restored = train_iterator(cfg, **kwargs)
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(40)], strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])
    # Same seed -> same stream from scratch; a new seed -> another one.
    again = train_iterator(cfg, **kwargs)
    np.testing.assert_array_equal(next(again)["inputs"], first[0]["inputs"])
    other = train_iterator(cfg, **{**kwargs, "seed": 8})
    assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_host_shards_are_disjoint_and_cover_the_data():
    tok = ByteTokenizer()
    texts = random_documents(60)
    seed = int(RNG.integers(1 << 30))

    def pieces(**shard):
        out = collections.Counter()
        for row in packed_rows(
            texts, tok, seq_len=64, seed=seed, shuffle=True, num_epochs=1, num_bins=4, **shard
        ):
            out.update(row_pieces(row, tok.pad_id))
        return out

    single = pieces()
    shards = [pieces(shard_index=i, shard_count=3) for i in range(3)]
    # Host i reads exactly documents i, i + 3, ... (disjoint by construction), all of each.
    for i in range(3):
        assert shards[i] == reference_pieces(texts[i::3], tok, 64)
    assert sum(shards, collections.Counter()) == single == reference_pieces(texts, tok, 64)


def test_train_iterator_shapes_per_host(files_dir):
    root, _ = files_dir
    cfg = DataConfig(dataset="files", files=str(root / "**" / "*.*"))
    batches = [
        next(
            train_iterator(
                cfg, global_batch_size=6, seq_len=20, seed=0, shard_index=i, shard_count=3
            )
        )
        for i in range(3)
    ]
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == {k: (2, 20) for k in BATCH_KEYS}
    assert (
        batches[0]["segment_ids"].dtype == np.int32 and batches[0]["loss_mask"].dtype == np.float32
    )


def test_eval_batches_deterministic_and_complete(files_dir):
    root, texts = files_dir
    cfg = DataConfig(dataset="files", files=str(root / "**" / "*.*"))
    runs = [list(eval_batches(cfg, batch_size=3, seq_len=16, max_batches=None)) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    assert all(b["inputs"].shape == (3, 16) for b in runs[0])
    tok = ByteTokenizer()
    got = collections.Counter()
    for batch in runs[0]:
        for r in range(3):
            got.update(row_pieces({k: v[r] for k, v in batch.items()}, tok.pad_id))
    val_texts = list(eval_documents(cfg))
    assert got == reference_pieces(val_texts, tok, 16)
    assert len(list(eval_batches(cfg, batch_size=3, seq_len=16, max_batches=1))) == 1
    # Per-host slices of the same global batches: as many batches on every host, whose rows
    # stacked in host order are the single-host batches of 3 rows.
    hosts = [
        list(eval_batches(cfg, batch_size=1, seq_len=16, shard_index=i, shard_count=3))
        for i in range(3)
    ]
    assert len({len(h) for h in hosts}) == 1
    for key in BATCH_KEYS:
        stacked = [np.concatenate([h[b][key] for h in hosts]) for b in range(len(hosts[0]))]
        np.testing.assert_array_equal(np.stack(stacked), np.stack([b[key] for b in runs[0]]))


# --- files dataset ------------------------------------------------------------------------


def test_files_dataset_txt_and_jsonl(files_dir):
    root, texts = files_dir
    cfg = DataConfig(dataset="files", files=str(root / "**" / "*.*"))
    train = list(eval_documents(cfg, "train"))
    val = list(eval_documents(cfg, "validation"))
    assert sorted(train + val) == sorted(texts) and not set(train) & set(val)
    assert val  # 100 documents at ~5% land some in validation with this fixed seed
    # A document's tokens are its bytes between bos and eos.
    tok = ByteTokenizer()
    assert [len(document_tokens(tok, t)) for t in train] == [len(t.encode()) + 2 for t in train]
    jsonl_only = DataConfig(dataset="files", files=str(root / "*.jsonl"))
    assert (
        len(list(eval_documents(jsonl_only, "train"))) + len(list(eval_documents(jsonl_only))) == 60
    )


# --- another TFDS dataset -------------------------------------------------------------


class CtxextTestBooks(tfds.core.GeneratorBasedBuilder):
    """Stands in for a user-prepared TFDS dataset such as pg19 (text under 'book_text')."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"book_text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 3)}

    def _generate_examples(self, split, n):
        for i in range(n):
            yield f"{split}-{i}", {"book_text": f"book {split}-{i} " * (i + 1)}


def test_prepared_tfds_dataset_by_name(tmp_path):
    CtxextTestBooks(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = DataConfig(
        dataset="ctxext_test_books", data_dir=str(tmp_path), text_key="book_text", eval_split="test"
    )
    assert sorted(eval_documents(cfg)) == sorted(f"book 1-{i} " * (i + 1) for i in range(3))
    batch = next(train_iterator(cfg, global_batch_size=2, seq_len=16, seed=0))
    assert batch["inputs"].shape == (2, 16)
    with pytest.raises(ValueError, match="data.text_key='text'"):
        next(
            eval_documents(
                DataConfig(dataset="ctxext_test_books", data_dir=str(tmp_path), eval_split="test")
            )
        )


# --- tokenizers -----------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = make_tokenizer("bytes")
    text = "".join(RNG.choice(WORDS, size=50)) + "\x00\n\t€𝄞"
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    assert max(ids) < tok.vocab_size


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    lines = [" ".join(RNG.choice(WORDS[:11], size=12)) for _ in range(300)]
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,
        vocab_size=60,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    tok = make_tokenizer(f"sentencepiece:{prefix}.model")
    ref = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (
        ref.get_piece_size(),
        ref.bos_id(),
        ref.eos_id(),
    )
    for line in lines[:20]:
        assert tok.encode(line) == ref.encode(line)
        assert tok.decode(tok.encode(line)) == line
    clone = pickle.loads(pickle.dumps(tok))  # what Grain worker processes receive
    assert clone.encode(lines[0]) == tok.encode(lines[0])
    rows = list(
        packed_rows(lines[:30], tok, seq_len=16, seed=0, shuffle=True, num_epochs=1, num_bins=4)
    )
    got = collections.Counter(p for r in rows for p in row_pieces(r, tok.pad_id))
    assert got == reference_pieces(lines[:30], tok, 16)


def test_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.WordLevel(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(
        [" ".join(RNG.choice(WORDS, size=10)) for _ in range(200)],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<|begin|>", "<|end|>"]),
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}, "pad_token": "<pad>"}
        )
    )
    for spec in (f"hf:{folder}", f"hf:{folder / 'tokenizer.json'}"):
        tok = make_tokenizer(spec)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)
        assert tok.vocab_size == hf.get_vocab_size()
        text = "key value río naïve"
        assert tok.encode(text) == hf.encode(text).ids
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text).ids)
    assert pickle.loads(pickle.dumps(tok)).encode("data key") == tok.encode("data key")
    # Without tokenizer_config.json only the usual spellings (</s>, <|endoftext|>, ...) count,
    # and '<|end|>' is none of them: no eos is an error.
    os.remove(folder / "tokenizer_config.json")
    with pytest.raises(ValueError, match="no end-of-text token"):
        make_tokenizer(f"hf:{folder}")


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dataset=""), "data.dataset is empty"),
        (dict(dataset="files"), "data.files is empty"),
        (dict(seq_len=1), "data.seq_len=1"),
        (dict(num_workers=-1), "data.num_workers=-1"),
        (dict(tokenizer="gpt2"), "data.tokenizer='gpt2'"),
        (dict(tokenizer="sentencepiece"), "data.tokenizer='sentencepiece'"),
        (dict(text_key=""), "data.text_key is empty"),
        (dict(eval_split=""), "data.eval_split is empty"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_bad_inputs(tmp_path, data_dir, files_dir):
    root, _ = files_dir
    with pytest.raises(ValueError, match="data.dataset='no_such_corpus_xyz'.*tfds build"):
        next(eval_documents(DataConfig(dataset="no_such_corpus_xyz", data_dir=str(tmp_path))))
    with pytest.raises(ValueError, match=r"data.files=.*matches no .txt or .jsonl"):
        next(eval_documents(DataConfig(dataset="files", files=str(tmp_path / "*.txt"))))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="hold no text"):
        next(eval_documents(DataConfig(dataset="files", files=str(tmp_path / "empty" / "*"))))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only one document")  # hashes to train
    assert split_of("a.txt") == "train"
    with pytest.raises(ValueError, match="data.eval_split='validation'.*no documents"):
        next(
            eval_batches(
                DataConfig(dataset="files", files=str(tmp_path / "one" / "*.txt")),
                batch_size=1,
                seq_len=8,
            )
        )
    with pytest.raises(ValueError, match="data.train_split='test'"):
        train_iterator(
            DataConfig(dataset="files", files=str(root / "*.jsonl"), train_split="test"),
            global_batch_size=1,
            seq_len=8,
            seed=0,
        )
    with pytest.raises(ValueError, match="cannot open split 'bogus'"):
        next(eval_documents(DataConfig(dataset="embedded", data_dir=data_dir), "bogus"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="data.tokenizer='sentencepiece:.*cannot load"):
        make_tokenizer(f"sentencepiece:{garbage}")
    with pytest.raises(ValueError, match="data.tokenizer='hf:.*cannot load"):
        make_tokenizer(f"hf:{garbage}")
    with pytest.raises(ValueError, match="does not exist"):
        make_tokenizer(f"hf:{tmp_path / 'missing.json'}")
    jsonl = DataConfig(dataset="files", files=str(root / "*.jsonl"), text_key="body")
    with pytest.raises(ValueError, match="data.text_key='body'"):
        list(eval_documents(jsonl, "train"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jsonl").write_text('{"text": "fine"}\n{"text": cut\n')
    broken = DataConfig(dataset="files", files=str(tmp_path / "broken" / "*.jsonl"))
    with pytest.raises(ValueError, match=r"line at byte 17 of .*a.jsonl is not valid JSON"):
        list(eval_documents(broken, "train"))
    with pytest.raises(ValueError, match="train.batch_size=5 is not divisible"):
        train_iterator(jsonl, global_batch_size=5, seq_len=8, seed=0, shard_index=0, shard_count=2)


def test_from_config_reads_the_data_section():
    import ml_collections

    section = ml_collections.ConfigDict(
        {"dataset": "files", "files": "/x/*.txt", "seq_len": 64, "extra": 1}
    )
    cfg = DataConfig.from_config(section)
    assert (cfg.dataset, cfg.files, cfg.seq_len, cfg.tokenizer) == (
        "files",
        "/x/*.txt",
        64,
        "bytes",
    )


def test_worker_processes_match_and_restore(files_dir):
    root, _ = files_dir
    cfg = DataConfig(dataset="files", files=str(root / "**" / "*.*"), num_workers=2)
    kwargs = dict(global_batch_size=2, seq_len=24, seed=1)
    it = train_iterator(cfg, **kwargs)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    it.close()
    restored = train_iterator(cfg, **kwargs)
    restored.set_state(state)
    got = [next(restored) for _ in range(5)]
    restored.close()
    for want, have in zip(expected, got, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(want[key], have[key])
    # Workers read disjoint slices: the stream differs from in-process reading but has the
    # same shapes and invariants.
    tok = ByteTokenizer()
    for batch in got:
        for r in range(2):
            row_pieces({k: v[r] for k, v in batch.items()}, tok.pad_id)


def test_synthetic_key_recall_documents(data_dir):
    cfg = DataConfig(dataset="synthetic", data_dir=data_dir)
    splits = {s: open_split(cfg, s) for s in ("train", "validation")}
    assert splits["train"][1]["provenance"]["seed"] == builders.CtxextSynthetic.SEED
    counts = {s: len(documents) for s, (documents, _) in splits.items()}
    assert counts == builders.CtxextSynthetic.NUM_DOCUMENTS
    docs = list(eval_documents(cfg))
    lengths = [len(d) for d in docs]
    assert min(lengths) < 512 and max(lengths) > 4096  # short and long-range documents
    for doc in docs:
        lines = doc.splitlines()
        key = lines[1].split("'")[1]
        assert lines[-1] == f"assert key == '{key}'" and doc.count(key) == 2
    assert docs == list(eval_documents(cfg))
