"""The autograd function every sparse linear calls."""

from __future__ import annotations

import torch

from sparse_lm.sparsity.kernels.gathered import GatheredProduct, run_passes
from sparse_lm.sparsity.kernels.products import sparse_product, value_gradient


class SparseMatmul(torch.autograd.Function):
    """y = x · W_Aᵀ where W_A holds `values * forward_mask` at grid positions `index`; the
    gradient for `values` covers all of B.

    With `penalty` λ > 0 the value gradient gets Top-KAST's exploration penalty, λ·θ on A and
    λ·θ / D on B \\ A (docs/design/topkast.md), so that clipping and the optimizer see the gradient a
    dense Top-KAST would. Only x (an activation) is saved for backward; A's slots and effective
    values are found again there rather than kept alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, values, forward_mask, stored_index, shape, block, penalty, density):
        x2 = x.reshape(-1, shape[1])
        out = sparse_product(x2, values, forward_mask, stored_index, shape, block, transpose=True)
        if isinstance(out, GatheredProduct):
            product = out
            run_passes([x2], block, product.add)
            out = product.out
        ctx.save_for_backward(x, values, forward_mask, stored_index)
        ctx.shape, ctx.block, ctx.penalty, ctx.density = shape, block, penalty, density
        return out.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values, forward_mask, index = ctx.saved_tensors
        shape, block = ctx.shape, ctx.block
        x2 = x.reshape(-1, shape[1])
        g2 = grad_out.reshape(-1, shape[0])
        grad_x = grad_values = product = sddmm = None
        if ctx.needs_input_grad[0]:
            grad_x = product = sparse_product(g2, values, forward_mask, index, shape, block, transpose=False)
        if ctx.needs_input_grad[1]:
            grad_values = torch.zeros_like(values)
            sddmm = value_gradient(g2, x2, index, shape, block, grad_values)
        gathered = isinstance(product, GatheredProduct)
        if gathered or sddmm is not None:  # one pass over the tokens for both: gᵀ is transposed once

            def feed(t0, g_t, *x_t):
                if gathered:
                    product.add(t0, g_t)
                if sddmm is not None:
                    sddmm.add(g_t, *x_t)

            run_passes([g2, x2] if sddmm is not None else [g2], block, feed)
        if gathered:
            grad_x = product.out
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        if sddmm is not None:
            grad_values[sddmm.slots] = sddmm.result().to(values.dtype)
        if grad_values is not None and ctx.penalty:
            scale = torch.where(forward_mask, ctx.penalty, ctx.penalty / ctx.density).to(values.dtype)
            grad_values += scale.view(-1, 1, 1) * values
        return grad_x, grad_values, None, None, None, None, None, None
