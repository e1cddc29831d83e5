from sparse_lm.model.llama import BLOCK_LINEARS, Llama, LinearFactory, dense_linear, init_weights, resolve_vocab

__all__ = ["BLOCK_LINEARS", "Llama", "LinearFactory", "dense_linear", "init_weights", "resolve_vocab"]
