"""ctxext_jax: context extension for decoder language models in JAX."""

import setuptools

setuptools.setup(
    name="ctxext_jax",
    version="0.1.0",
    description="Context extension for decoder language models in JAX.",
    packages=setuptools.find_packages(include=["ctxext_jax", "ctxext_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9.8,<4.10",
        "array-record>=0.7",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "ml-dtypes>=0.4",
        "absl-py>=2.0",
        "etils[epath]>=1.7",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            # The parity references. torch==2.13.0 is the CPU build; a looser pin pulls CUDA.
            "torch==2.13.0",
            "transformers>=5.0,<5.24",
        ],
    },
)
