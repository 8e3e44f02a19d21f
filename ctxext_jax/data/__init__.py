"""Data: TFDS builders (embedded stdlib corpus, synthetic key recall), local files,
tokenizers (bytes, SentencePiece, HF tokenizers) and the packed Grain pipeline."""

from ctxext_jax.data.config import DataConfig
from ctxext_jax.data.pipeline import (
    BATCH_KEYS,
    eval_batches,
    eval_documents,
    train_iterator,
)
from ctxext_jax.data.preflight import preflight
from ctxext_jax.data.streams import global_train_iterator
from ctxext_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "eval_batches",
    "eval_documents",
    "global_train_iterator",
    "make_tokenizer",
    "preflight",
    "train_iterator",
]
