"""Model shapes the benchmarks share (fields of `config.defaults().model`)."""

SHAPES = {
    # configs/tiny.py's model
    "tiny": dict(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                 mlp_dim=384, dtype="float32"),
    # benchmarks/context_parallel.py's CPU default (fake devices: 8 heads so that any n divides)
    "small": dict(vocab_size=320, d_model=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16,
                  mlp_dim=512, dtype="float32"),
    # the 336M long-context shape of the memory and decode studies (Llama layout, 32k vocabulary)
    "336m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4,
                 head_dim=64, mlp_dim=2816, dtype="bfloat16"),
    # Llama 3.2 1B (configs/llama_1b.py with the Llama 3 vocabulary)
    "1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
               head_dim=64, mlp_dim=8192, tie_embeddings=True, dtype="bfloat16"),
}  # fmt: skip
