"""Sparsity methods, one module each (`dense`, `static`, `topkast`, `spartan`), named in `registry`.

A method object (`base.SparsityMethod`) owns what is specific to it — its validation, the linear
it builds, its initialisation, its between-steps schedule, what it costs in FLOPs and bytes — and
the rest of the code asks it, never compares its name (docs/design/methods.md).
"""
