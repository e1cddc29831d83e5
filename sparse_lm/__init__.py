"""sparse_lm: always-sparse distributed pretraining of Llama-style language models."""

__version__ = "0.1.0"
