"""TFDS builders for data present on every machine: the stdlib sources and seeded key recall.

Both write array_record files, which `tfds.data_source` reads with random access for Grain;
TFDS does this without TensorFlow installed.

* `CtxextEmbedded`: every `*.py` file of the running interpreter's standard library
  (site-packages excluded), one document per file. The builder config name carries the Python
  version and a hash of the file list, so another interpreter prepares its own copy instead
  of reading a stale one. Provenance goes into the description and `metadata.json`.
* `CtxextSynthetic`: documents that define a key at the start, pad it with filler and ask for
  it at the end, so the loss on the final line needs the whole document in context.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pathlib
import platform
import sysconfig
import tokenize

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ctxext_jax.data.splits import VALIDATION_PER_MILLE, split_of


@functools.cache
def stdlib_files() -> tuple[pathlib.Path, list[str]]:
    """(stdlib root, sorted relative paths of its *.py files outside site-/dist-packages); read
    once per process (every builder instance names its config by them)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    )
    return root, paths


def _file_list_hash(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


def _read_source(path: pathlib.Path) -> str | None:
    """The file's text in its declared encoding; None for the few test files that are
    deliberately undecodable."""
    raw = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def embedded_provenance() -> dict:
    root, paths = stdlib_files()
    return {
        "source": "standard library *.py files of the interpreter that prepared the dataset",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_path": str(root),
        "num_files": len(paths),
        "file_list_sha256": _file_list_hash(paths),
        "split_rule": f"sha256(relative path) % 1000 < {VALIDATION_PER_MILLE} -> validation",
    }


def embedded_config_name() -> str:
    """e.g. 'py3.11.7_cpython_1a2b3c4d': one prepared copy per interpreter and file list."""
    _, paths = stdlib_files()
    return (
        f"py{platform.python_version()}_{platform.python_implementation().lower()}_"
        f"{_file_list_hash(paths)[:8]}"
    )


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose code path is this file and whose preparation says it downloads nothing.

    TFDS 4.9.10 finds a packaged builder's code path through `importlib_resources`, which it
    only installs on Python < 3.9; naming the path here avoids that import.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    # TFDS announces "Downloading and preparing dataset ..." before generating; nothing is
    # downloaded here, so say what happens instead.
    def _log_download_bytes(self) -> None:
        print(f"preparing {self.name} (built locally, nothing is downloaded) in {self.data_dir}")

    def _log_download_done(self) -> None:
        print(f"prepared {self.name} in {self.data_dir}")


class CtxextEmbedded(_LocalBuilder):
    """The running interpreter's standard-library sources, one document per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "stdlib *.py files, sha256-of-path train/validation split."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=embedded_config_name())]

    def _info(self) -> tfds.core.DatasetInfo:
        provenance = embedded_provenance()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Embedded long documents: "
            + "; ".join(f"{k}={v}" for k, v in provenance.items()),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            metadata=tfds.core.MetadataDict(provenance),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        root, paths = stdlib_files()
        by_split = {"train": [], "validation": []}
        for rel in paths:
            by_split[split_of(rel)].append(rel)
        return {name: self._generate_examples(root, rels) for name, rels in by_split.items()}

    def _generate_examples(self, root: pathlib.Path, rels: list[str]):
        for rel in rels:
            text = _read_source(root / rel)
            if text:
                yield rel, {"text": text, "path": rel}


_WORDS = (
    "alpha beta gamma delta river stone cloud paper lamp tree field north south quiet "
    "amber copper violet signal window garden harbor meadow orbit pixel vector kernel"
).split()


def synthetic_document(rng: np.random.Generator, index: int, *, length: int) -> str:
    """One key-recall document of about `length` characters.

    The key is 8 random lowercase letters; nothing between its definition and the final
    recall line carries information about it.
    """
    key = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=8))
    head = f"# record {index}\nkey = '{key}'\n"
    tail = f"assert key == '{key}'\n"
    lines = []
    size = len(head) + len(tail)
    while size < length:
        words = rng.choice(_WORDS, size=int(rng.integers(3, 9)))
        line = f"v{int(rng.integers(0, 100))} = '{' '.join(words)}'\n"
        lines.append(line)
        size += len(line)
    return head + "".join(lines) + tail


class CtxextSynthetic(_LocalBuilder):
    """Seeded key-recall documents, lengths log-uniform in [min_chars, max_chars]."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "key-recall documents from numpy's PCG64 seeded generator."}
    SEED = 0
    NUM_DOCUMENTS = {"train": 4000, "validation": 200}
    MIN_CHARS, MAX_CHARS = 128, 8192

    def _info(self) -> tfds.core.DatasetInfo:
        provenance = {
            "source": "synthetic key-recall documents (ctxext_jax.data.builders)",
            "seed": self.SEED,
            "num_documents": dict(self.NUM_DOCUMENTS),
            "length_chars": [self.MIN_CHARS, self.MAX_CHARS],
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic long-range documents: a key defined on line 2 must be "
            "recalled on the last line. " + "; ".join(f"{k}={v}" for k, v in provenance.items()),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            metadata=tfds.core.MetadataDict(provenance),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            name: self._generate_examples(offset, count)
            for offset, (name, count) in enumerate(self.NUM_DOCUMENTS.items())
        }

    def _generate_examples(self, offset: int, count: int):
        # One stream per split keeps validation independent of the train size.
        rng = np.random.default_rng([self.SEED, offset])
        log_lo, log_hi = np.log(self.MIN_CHARS), np.log(self.MAX_CHARS)
        for i in range(count):
            length = int(np.exp(rng.uniform(log_lo, log_hi)))
            key = f"{offset}-{i}"
            yield key, {"text": synthetic_document(rng, i, length=length), "path": key}
