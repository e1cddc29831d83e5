"""The names of the sparsity methods and the module of each: the one list a new method joins.

Torch-free and import-light, so that the config can validate `sparsity.method` without loading a
method's machinery; `method_of` imports the module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparse_lm.methods.base import SparsityMethod

DENSE = "dense"

# name → module defining METHOD (a `base.SparsityMethod`), in the order the docs list them.
METHODS = {
    DENSE: "sparse_lm.methods.dense",
    "static": "sparse_lm.methods.static",
    "topkast": "sparse_lm.methods.topkast",
    "spartan": "sparse_lm.methods.spartan",
    "rigl": "sparse_lm.methods.rigl",
}


def method_of(name: str) -> SparsityMethod:
    """The method object of `sparsity.method` (validated by the config)."""
    return importlib.import_module(METHODS[name]).METHOD
