from sparse_lm.model.init import init_weights
from sparse_lm.model.llama import LinearFactory, Llama, Vocabulary, dense_linear, resolve_vocab

__all__ = ["LinearFactory", "Llama", "Vocabulary", "dense_linear", "init_weights", "resolve_vocab"]
