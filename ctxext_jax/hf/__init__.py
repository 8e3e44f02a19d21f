"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 model folders.

    from ctxext_jax import hf
    model = hf.from_pretrained("path/to/hf_model")      # config.json + *.safetensors
    logits = model(tokens)                              # int32 [B, T] -> float32 [B, T, V]
    hf.save_pretrained(model.params, model.config, "out")   # AutoModelForCausalLM loads it

load.py reads folders (config mapping, lazy safetensors reader, sharded placement), export.py
writes them (config.json, safetensors shards, tokenizer files), layout.py holds the tensor
names and weight layouts both share.
"""

from ctxext_jax.hf.export import (
    TOKENIZER_FILES,
    TORCH_DTYPES,
    check_tokenizer,
    config_to_hf,
    copy_tokenizer,
    default_architecture,
    save_pretrained,
    tokenizer_spec,
    write_byte_tokenizer,
)
from ctxext_jax.hf.layout import ARCHITECTURES, HF_ROPE_TYPES
from ctxext_jax.hf.load import (
    HFModel,
    SafetensorsFolder,
    config_from_hf,
    family_of,
    from_pretrained,
    is_hf_folder,
    load_params,
    model_json,
    read_config,
    single_device_mesh,
)

__all__ = [
    "ARCHITECTURES",
    "HF_ROPE_TYPES",
    "TOKENIZER_FILES",
    "TORCH_DTYPES",
    "HFModel",
    "SafetensorsFolder",
    "check_tokenizer",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer",
    "write_byte_tokenizer",
    "default_architecture",
    "family_of",
    "from_pretrained",
    "is_hf_folder",
    "load_params",
    "model_json",
    "read_config",
    "save_pretrained",
    "single_device_mesh",
    "tokenizer_spec",
]
