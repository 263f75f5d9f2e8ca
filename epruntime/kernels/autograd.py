"""Differentiable permute and unpermute-combine (one backend call each way).

permute's backward is a weight-free combine of the gradient rows; unpermute-combine's backward
permutes the output gradient back to rows (times the weight) and gives each weight the dot
product of its row with the output gradient. Both match autograd through the torch reference
(same ops, same rounding).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, layout, backend):
        from epruntime.kernels import permute

        ctx.layout, ctx.backend = layout, backend
        return permute(x_TH, layout, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NH):
        from epruntime.kernels import unpermute_combine

        layout = ctx.layout
        return (unpermute_combine(grad_NH, layout, None, layout.num_tokens, backend=ctx.backend),
                None, None)


class _UnpermuteCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_NH, weight_TR, layout, backend):
        from epruntime.kernels import unpermute_combine

        ctx.layout, ctx.backend = layout, backend
        ctx.save_for_backward(rows_NH, weight_TR)
        return unpermute_combine(rows_NH, layout, weight_TR, layout.num_tokens, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TH):
        from epruntime.kernels import permute

        rows_NH, weight_TR = ctx.saved_tensors
        layout = ctx.layout
        grad_out_NH = permute(grad_TH, layout, backend=ctx.backend)  # grad_out[token of row]
        grad_rows = grad_weight = None
        if weight_TR is None:
            grad_rows = grad_out_NH
        else:
            if ctx.needs_input_grad[0]:
                w_N = layout.rows_of(weight_TR).to(rows_NH.dtype)
                grad_rows = grad_out_NH * w_N[:, None]
            if ctx.needs_input_grad[1]:
                dot_N = (grad_out_NH * rows_NH).sum(1).to(weight_TR.dtype)
                grad_RT = weight_TR.new_zeros(layout.num_ranks, layout.num_tokens)
                grad_RT[layout.token_in_rank_TR.t()] = dot_N
                grad_weight = grad_RT.t()
        return grad_rows, grad_weight, None, None


def permute_differentiable(x_TH: torch.Tensor, layout, backend: str | None = None
                           ) -> torch.Tensor:
    """`permute` with a gradient: x_TH [T, H] -> rows_NH [N, H]."""
    return _Permute.apply(x_TH, layout, backend)


def unpermute_combine_differentiable(rows_NH: torch.Tensor, layout,
                                     weight_TR: torch.Tensor | None = None,
                                     backend: str | None = None) -> torch.Tensor:
    """`unpermute_combine` with gradients for rows_NH and weight_TR: -> out_TH [T, H]."""
    return _UnpermuteCombine.apply(rows_NH, weight_TR, layout, backend)
