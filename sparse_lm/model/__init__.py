from sparse_lm.model.llama import Llama, LinearFactory, dense_linear, init_weights, resolve_vocab

__all__ = ["Llama", "LinearFactory", "dense_linear", "init_weights", "resolve_vocab"]
