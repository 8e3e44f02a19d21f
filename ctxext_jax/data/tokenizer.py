"""Tokenizers: UTF-8 bytes (default), SentencePiece models and Hugging Face `tokenizers` files.

Every tokenizer is rebuilt from its spec string when pickled, so Grain worker processes get
their own copy without shipping C++ objects across processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: pad=0, bos=1, eos=2, byte b -> b + 3."""

    spec = "bytes"
    vocab_size = 259
    pad_id = 0
    bos_id = 1
    eos_id = 2
    _OFFSET = 3

    def encode_array(self, text: str) -> np.ndarray:
        """text -> int32 [N] without specials."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self._OFFSET

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        # Specials carry no bytes; a cut inside a multi-byte character decodes to U+FFFD.
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        raw = (ids[ids >= self._OFFSET] - self._OFFSET).astype(np.uint8).tobytes()
        return raw.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; its own bos/eos ids, pad falls back to unk (masked)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.spec = f"sentencepiece:{path}"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"data.tokenizer={self.spec!r}: cannot load a SentencePiece model from {path!r} "
                f"({e}); point it at a readable .model file."
            ) from e
        self.vocab_size = int(self._sp.GetPieceSize())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"data.tokenizer={self.spec!r}: the model has no bos or eos piece (ids "
                f"{self.bos_id}, {self.eos_id}); train it with bos_id/eos_id >= 0."
            )
        # Padding is always masked out of the loss, so any valid id works when none is defined.
        self.pad_id = next(i for i in (self._sp.pad_id(), self._sp.unk_id(), 0) if i >= 0)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def __reduce__(self):
        return make_tokenizer, (self.spec,)


# Special-token spellings of common families, tried when no tokenizer_config.json names them.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (or a folder holding one).

    bos/eos/pad come from a tokenizer_config.json next to the file when there is one, otherwise
    from the usual spellings; a vocabulary without a bos token uses eos as the document
    separator at the start too (the GPT-2 / Qwen convention).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizerImpl

        self.spec = f"hf:{path}"
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = HFTokenizerImpl.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(
                f"data.tokenizer={self.spec!r}: cannot load a tokenizers file from {file!r} ({e}); "
                "point it at a tokenizer.json or a folder that holds one."
            ) from e
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        named = _special_tokens_from_config(os.path.dirname(file))
        eos = self._find(named.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise ValueError(
                f"data.tokenizer={self.spec!r}: no end-of-text token found; add 'eos_token' to a "
                f"tokenizer_config.json next to it or add one of {list(_EOS_CANDIDATES)}."
            )
        bos = self._find(named.get("bos_token"), _BOS_CANDIDATES)
        pad = self._find(named.get("pad_token"), ())
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad

    def _find(self, named: str | None, candidates: Sequence[str]) -> int | None:
        for token in ([named] if named else []) + list(candidates):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __reduce__(self):
        return make_tokenizer, (self.spec,)


def _special_tokens_from_config(folder: str) -> dict[str, str]:
    """{"bos_token": "<s>", ...} from tokenizer_config.json in `folder`, if present."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = raw.get(key)
        # Newer files store AddedToken dicts: {"content": "<s>", ...}.
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def make_tokenizer(spec: str) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    """ "bytes" | "sentencepiece:/path/model" | "hf:/path/tokenizer.json or folder"."""
    kind, _, path = spec.partition(":")
    if kind == "bytes" and not path:
        return ByteTokenizer()
    if kind in ("sentencepiece", "hf") and path:
        if not os.path.exists(path):
            raise ValueError(
                f"data.tokenizer={spec!r}: {path!r} does not exist; point it at a "
                + ("SentencePiece .model file." if kind == "sentencepiece" else "tokenizer.json.")
            )
        return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)
    raise ValueError(
        f"data.tokenizer={spec!r} is not understood: use 'bytes', "
        "'sentencepiece:/path/to/model' or 'hf:/path/to/tokenizer.json' (or its folder)."
    )
