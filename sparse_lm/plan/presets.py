"""A small family of Llama shapes, for "what is the largest model that fits?" (Llama 2's 7B, 13B
and 70B, Code Llama's 34B, TinyLlama's 1B, Llama 3.2's 3B; all with this project's 32k vocabulary)."""

from __future__ import annotations

LLAMA_FAMILY = {
    "1B": {"d_model": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "ffn_hidden": 5632},
    "3B": {"d_model": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_hidden": 8192},
    "7B": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 0, "ffn_hidden": 11008},
    "13B": {"d_model": 5120, "n_layers": 40, "n_heads": 40, "n_kv_heads": 0, "ffn_hidden": 13824},
    "34B": {"d_model": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "ffn_hidden": 22016},
    "70B": {"d_model": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_hidden": 28672},
}
