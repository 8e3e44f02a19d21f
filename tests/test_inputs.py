"""Bad input — a malformed, undecodable, missing or damaged file, an empty split, a tokenizer
that does not fit, an unusable init_from or workdir — is found before the first step and is one
line naming the key and the file, exit code 2 (through the CLIs' error handling, in-process)."""

import json
import os
import shutil

import pytest
import tensorflow_datasets as tfds

from configs import tiny
from ctxext_jax.data import builders
from ctxext_jax.data.config import DataConfig
from ctxext_jax.data.sources import open_split
from ctxext_jax.restore import resolve
from ctxext_jax.train import make_workdir, preflight


class CtxextTestShards(builders._LocalBuilder):
    """A tiny prepared TFDS dataset (array_record shards) standing in for pg19 and the like."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, 12),
            "validation": self._generate_examples(1, 3),
        }

    def _generate_examples(self, split, n):
        for i in range(n):
            yield f"{split}-{i}", {"text": f"document {split}-{i} " * (i + 2)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    CtxextTestShards(data_dir=str(root), file_format="array_record").download_and_prepare()
    return root


def _config(**data):
    config = tiny.get_config("test")
    config.data.update(data)
    return config


def _files(tmp_path, **contents) -> str:
    """Writes name -> str / bytes into tmp_path/docs; returns the glob of the folder."""
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    for name, content in contents.items():
        name = name.replace("_txt", ".txt").replace("_jsonl", ".jsonl")
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(folder / "*")


GOOD = "".join(json.dumps({"text": f"document {i} " * 4}) + "\n" for i in range(60))


def _shard(root, split="train"):
    return next(root.rglob(f"*-{split}.array_record-00000-of-00001"))


def _copy(shards, tmp_path):
    return shutil.copytree(shards, tmp_path / "copy")


def _hf_folder(tmp_path, config_json: str):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config_json)
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _tokenizer_json(tmp_path, size: int) -> str:
    from tokenizers import Tokenizer, models

    vocab = {"</s>": 0, **{f"t{i}": i + 1 for i in range(size - 1)}}
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="</s>")).save(str(path))
    return str(path)


def _damaged_run(tmp_path) -> str:
    step = tmp_path / "run" / "checkpoints" / "3"
    (step / "params").mkdir(parents=True)
    (step / "model").mkdir()
    (step / "model" / "metadata").write_text("{not json")
    return str(tmp_path / "run")


def _files_config(tmp_path, **contents):
    return _config(dataset="files", files=_files(tmp_path, **contents))


# (id, build(tmp_path, shards) -> config or a callable to run, key named, file/text named)
CASES = [
    ("jsonl-malformed", lambda t, s: _files_config(t, a_jsonl=GOOD + '{"text": cut\n'),
     "data.files", "a.jsonl"),
    ("jsonl-not-object", lambda t, s: _files_config(t, a_jsonl=GOOD + "[1, 2]\n"),
     "data.text_key", "a.jsonl"),
    ("jsonl-missing-key", lambda t, s: _files_config(t, a_jsonl=GOOD + '{"body": "x"}\n'),
     "data.text_key", "a.jsonl"),
    ("jsonl-number-text", lambda t, s: _files_config(t, a_jsonl=GOOD + '{"text": 3}\n'),
     "data.text_key", "a.jsonl"),
    ("glob-matches-nothing", lambda t, s: _config(dataset="files", files=str(t / "no" / "*.txt")),
     "data.files", "no/*.txt"),
    ("only-empty-files", lambda t, s: _files_config(t, a_txt="", b_jsonl="\n\n"),
     "data.files", "hold no text"),
    ("eval-split-empty", lambda t, s: _files_config(t, a_txt="only one document"),
     "data.eval_split", "no documents"),
    ("train-split-empty",
     lambda t, s: _config(dataset="files", files=_files(t, a_txt="x"), train_split="validation",
                          eval_split="train"),
     "data.train_split", "no documents"),
    ("txt-undecodable-refused",
     lambda t, s: _config(dataset="files", files=_files(t, a_jsonl=GOOD, bad_txt=b"ok \xff\xfe x"),
                          on_undecodable="refuse"),
     "data.on_undecodable", "bad.txt"),
    ("jsonl-undecodable-refused",
     lambda t, s: _config(dataset="files", on_undecodable="refuse",
                          files=_files(t, bad_jsonl=GOOD.encode() + b'{"text": "\xff"}\n')),
     "data.on_undecodable", "bad.jsonl"),
    ("sentencepiece-missing", lambda t, s: _config(tokenizer=f"sentencepiece:{t}/missing.model"),
     "data.tokenizer", "missing.model"),
    ("sentencepiece-garbage",
     lambda t, s: (t / "garbage.model").write_bytes(os.urandom(64))
     and _config(tokenizer=f"sentencepiece:{t}/garbage.model"),
     "data.tokenizer", "garbage.model"),
    ("hf-tokenizer-garbage",
     lambda t, s: (t / "tok.json").write_text("{") and _config(tokenizer=f"hf:{t}/tok.json"),
     "data.tokenizer", "tok.json"),
    ("tokenizer-larger-than-vocab",
     lambda t, s: _config(tokenizer=f"hf:{_tokenizer_json(t, 400)}"),
     "model.vocab_size", "400 tokens"),
    ("data-dir-is-a-file", lambda t, s: (t / "f").write_text("") or _config(data_dir=str(t / "f")),
     "data.data_dir", "/f"),
    ("tfds-unknown-name", lambda t, s: _config(dataset="no_such_corpus_xyz", data_dir=str(t)),
     "data.dataset", "no_such_corpus_xyz"),
    ("tfds-unknown-split",
     lambda t, s: _config(dataset="ctxext_test_shards", data_dir=str(s), eval_split="bogus"),
     "data.eval_split", "bogus"),
    ("tfds-wrong-text-key",
     lambda t, s: _config(dataset="ctxext_test_shards", data_dir=str(s), text_key="book_text"),
     "data.text_key", "book_text"),
    ("tfds-shard-missing",
     lambda t, s: _shard(_copy(s, t), "validation").unlink()
     or _config(dataset="ctxext_test_shards", data_dir=str(t / "copy")),
     "data.dataset", "validation.array_record-00000-of-00001"),
    ("tfds-shard-damaged",
     lambda t, s: _shard(_copy(s, t)).write_bytes(os.urandom(300))
     and _config(dataset="ctxext_test_shards", data_dir=str(t / "copy")),
     "data.dataset", "train.array_record-00000-of-00001"),
    ("tfds-shard-truncated",
     lambda t, s: (p := _shard(_copy(s, t))).write_bytes(p.read_bytes()[:40])
     and _config(dataset="ctxext_test_shards", data_dir=str(t / "copy")),
     "data.dataset", "train.array_record-00000-of-00001"),
    ("init-from-missing", lambda t, s: _config_init(str(t / "nothing")),
     "checkpoint.init_from", "/nothing"),
    ("init-from-a-file", lambda t, s: (t / "f").write_text("") or _config_init(str(t / "f")),
     "checkpoint.init_from", "/f is a file"),
    ("init-from-empty-dir", lambda t, s: _config_init(str(t)), "checkpoint.init_from",
     "holds no checkpoint"),
    ("init-from-damaged-model-item", lambda t, s: _config_init(_damaged_run(t)),
     "checkpoint.init_from", "run/checkpoints/3/model"),
    ("init-from-hf-bad-json", lambda t, s: _config_init(_hf_folder(t, "{oops")),
     "checkpoint.init_from", "config.json"),
    ("init-from-hf-unsupported",
     lambda t, s: _config_init(_hf_folder(t, json.dumps({"architectures": ["GPT2LMHeadModel"]}))),
     "checkpoint.init_from", "GPT2LMHeadModel"),
    ("workdir-is-a-file",
     lambda t, s: (t / "w").write_text("") or (lambda: make_workdir(str(t / "w"))),
     "--workdir", "/w is a file"),
    ("workdir-url", lambda t, s: lambda: make_workdir("gs://bucket/run"), "--workdir", "gs://"),
    ("checkpoint-missing",
     lambda t, s: lambda: resolve(tiny.get_config("test"), str(t / "nothing")),
     "--checkpoint", "/nothing does not exist"),
    ("checkpoint-damaged-model-item",
     lambda t, s: lambda: resolve(tiny.get_config("test"), _damaged_run(t)),
     "--checkpoint", "run/checkpoints/3/model"),
    ("file-gone-after-indexing",
     lambda t, s: _read_after_removing(_files(t, a_txt="text " * 50)), "data.files", "a.txt"),
]  # fmt: skip


def _config_init(path):
    config = tiny.get_config("test")
    config.checkpoint.init_from = path
    return config


def _read_after_removing(pattern):
    documents, _ = open_split(DataConfig(dataset="files", files=pattern), "train")
    os.remove(pattern.replace("*", "a.txt"))
    return lambda: documents[0]


@pytest.mark.parametrize("build,key,named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_key_and_file(build, key, named, tmp_path, shards,
                                                   cli_outcome):  # fmt: skip
    target = build(tmp_path, shards)
    code, lines = cli_outcome(target if callable(target) else lambda: preflight(target))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and key in lines[0] and named in lines[0], lines[0]
    assert "Traceback" not in lines[0] and len(lines[0]) < 1000


def test_bad_input_table_size():
    assert len(CASES) >= 25


def test_undecodable_text_is_counted_and_reported(tmp_path, capsys):
    config = _files_config(tmp_path, a_jsonl=GOOD, bad_txt=b"fine \xff then", ok_txt="fine")
    preflight(config)
    err = capsys.readouterr().err
    assert "warning: data.on_undecodable: 1 of 62 scanned documents" in err and "bad.txt" in err
    documents, _ = open_split(DataConfig.from_config(config.data), "train")
    assert any("\ufffd" in documents[i] for i in range(len(documents)))


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Files that start with U+FEFF, as some editors write them (.jsonl and .txt), pass the
    preflight and read without it."""
    bom = "\ufeff"
    config = _files_config(tmp_path, a_jsonl=bom + GOOD, b_txt=bom + "plain text " * 9)
    preflight(config)
    texts = []
    for split in ("train", "validation"):
        documents, _ = open_split(DataConfig.from_config(config.data), split)
        texts += [documents[i] for i in range(len(documents))]
    assert "plain text " * 9 in texts and "document 0 " * 4 in texts
    assert not any(bom in text for text in texts)


def test_local_builders_announce_no_download(tmp_path, capfd):
    CtxextTestShards(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    out = capfd.readouterr().out
    assert "Downloading" not in out and "nothing is downloaded" in out


def test_an_error_exit_lets_checkpoint_writes_finish(tmp_path, cli_outcome):
    """An error raised while a checkpoint is being written asynchronously exits 2 with one line
    only after the write has committed (the step folder is final, not Orbax's tmp folder)."""
    import jax.numpy as jnp

    from ctxext_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path), every=1, keep=1)
    state = {"step": jnp.int32(1), "params": {"w": jnp.ones((512, 512))},
             "opt_state": {"m": jnp.zeros((512, 512))}}  # fmt: skip

    class Data:  # the data iterator's checkpointed surface: one stream at position 0
        num_streams, streams = 1, (0,)

        def get_state(self):
            return {0: {"position": 0}}

    data = Data()

    def error_during_a_write():
        ckpt.save(1, state, data, config_json="{}", model_json="{}", force=True)
        raise ValueError("data.files: gone")

    code, lines = cli_outcome(error_during_a_write)
    assert code == 2 and lines == ["error: data.files: gone"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]
    assert (tmp_path / "checkpoints" / "1" / "params").is_dir()
