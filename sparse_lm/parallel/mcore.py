"""megatron-core, imported once, without compiling its fused kernels on the way.

Importing megatron-core wraps its fusions (bias-GeLU, SwiGLU, bias-dropout-add, ...) in
`torch.compile`, and the first `torch.compile` imports TorchDynamo and Inductor: 2 s of every
rank's start-up here (the import takes 1.5 s this way, 3.6–4.1 s without; CPU, torch 2.13), for
functions sparse_lm never calls: it uses megatron-core's process groups, tensor-parallel mappings
and vocab-parallel embedding and cross-entropy. megatron-core's own switch,
`jit.disable_jit_fuser()`, acts only after that import has run, so the import runs with
`torch.compile` as the identity, then the switch is thrown for anything decorated later.

Every use of megatron-core in sparse_lm imports it from here.
"""

from __future__ import annotations

import importlib
import sys

import torch


def _identity(model=None, **options):
    """torch.compile's signature, compiling nothing: `@compile` and `@compile(**options)` alike."""
    return model if model is not None else (lambda fn: fn)


def _import_megatron_core() -> None:
    if "megatron.core" not in sys.modules:  # otherwise whoever imported it first decided
        compile_ = torch.compile
        torch.compile = _identity
        try:
            importlib.import_module("megatron.core")
        finally:
            torch.compile = compile_
    from megatron.core import jit

    jit.disable_jit_fuser()


_import_megatron_core()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402

__all__ = ["ModelParallelConfig", "parallel_state", "tensor_parallel"]
