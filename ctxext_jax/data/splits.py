"""The train / validation assignment of built-in datasets, by a stable hash of a document's key
(the embedded builder, the `files` glob): shared by the builders and the sources."""

from __future__ import annotations

import hashlib

VALIDATION_PER_MILLE = 50  # ~5% of documents go to the validation split.


def split_of(key: str) -> str:
    """Deterministic train/validation assignment from a stable hash of a document's key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") % 1000
    return "validation" if bucket < VALIDATION_PER_MILLE else "train"
