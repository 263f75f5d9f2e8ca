"""The "triton" backend: Triton kernels for layout, permute, unpermute-combine and compaction.

Runs natively on CUDA devices, and on CPU tensors under the Triton interpreter
(`TRITON_INTERPRET=1`, which must be set before this module is imported: `triton.jit` reads it
when the kernels are defined). Programs are one per (token, hidden block); the layout's running
count down each rank column and the compaction's destination rows are torch prefix sums.
"""

from __future__ import annotations

import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # the backend reports itself unavailable
    triton, _IMPORT_ERROR = None, err
else:
    _IMPORT_ERROR = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Compiled, `acc + w * row` in float32 contracts to one FMA (one rounding instead of the
# reference's two): keep the multiply and the add apart so every backend is bit-identical.
_NO_FMA = {} if INTERPRETED else {"enable_fp_fusion": False}
BLOCK_E = 64


def unavailable_reason() -> str | None:
    if triton is None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    if not (INTERPRETED or torch.cuda.is_available()):
        return "needs a CUDA device, or TRITON_INTERPRET=1 set before epruntime.kernels loads"
    return None


if triton is not None:
    @triton.jit
    def _round(x_f32, dtype: tl.constexpr):
        """float32 -> dtype, round to nearest even. bfloat16 by bit arithmetic: the interpreter's
        float32 -> bfloat16 cast truncates, and this is exact on every target."""
        if dtype == tl.bfloat16:
            u = x_f32.to(tl.uint32, bitcast=True)
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)  # NaN stays NaN
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x_f32.to(dtype)

    @triton.jit
    def _layout_kernel(routing_ptr, rank_ptr, in_ptr, E, R, BLOCK: tl.constexpr):
        # in[t, rank_of_expert[e]] = 1 for every routed (t, e); duplicates write the same 1.
        t = tl.program_id(0).to(tl.int64)
        for e0 in range(0, E, BLOCK):
            offs = e0 + tl.arange(0, BLOCK)
            mask = offs < E
            routed = tl.load(routing_ptr + t * E + offs, mask=mask, other=0)
            rank = tl.load(rank_ptr + offs, mask=mask, other=0)
            ones = tl.full([BLOCK], 1, tl.uint8)
            tl.store(in_ptr + t * R + rank, ones, mask=mask & (routed != 0))

    @triton.jit
    def _permute_kernel(x_ptr, pos_ptr, off_ptr, out_ptr, R, H, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        row = tl.load(x_ptr + t * H + offs, mask=mask)
        for r in range(R):
            p = tl.load(pos_ptr + t * R + r)
            if p >= 0:
                dst = tl.load(off_ptr + r) + p
                tl.store(out_ptr + dst * H + offs, row, mask=mask)

    @triton.jit
    def _combine_kernel(rows_ptr, pos_ptr, off_ptr, w_ptr, out_ptr, R, H,
                        HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        # Ascending ranks, products rounded to the row dtype, float32 sum rounded once (the
        # reference's order and roundings, so results are bit-identical).
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        dtype = out_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(R):
            p = tl.load(pos_ptr + t * R + r)
            if p >= 0:
                src = tl.load(off_ptr + r) + p
                row = tl.load(rows_ptr + src * H + offs, mask=mask, other=0)
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + t * R + r)
                    row = _round(w.to(tl.float32) * row.to(tl.float32), dtype)
                acc = acc + row.to(tl.float32)
        tl.store(out_ptr + t * H + offs, _round(acc, dtype), mask=mask)

    @triton.jit
    def _compact_kernel(x_ptr, keep_ptr, dest_ptr, out_ptr, index_ptr, H, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        if tl.load(keep_ptr + t) != 0:
            d = tl.load(dest_ptr + t)
            offs = block * BLOCK + tl.arange(0, BLOCK)
            mask = offs < H
            tl.store(out_ptr + d * H + offs, tl.load(x_ptr + t * H + offs, mask=mask), mask=mask)
            if block == 0:
                tl.store(index_ptr + d, t)


def _block(h: int) -> int:
    return min(1024, triton.next_power_of_2(max(h, 1)))


def dispatch_layout(routing_map_TE, rank_of_expert_E, num_ranks):
    from epruntime.kernels import Layout

    t, e = routing_map_TE.shape
    in_TR = torch.zeros(t, num_ranks, dtype=torch.uint8, device=routing_map_TE.device)
    if t and e:
        _layout_kernel[(t,)](routing_map_TE.view(torch.uint8), rank_of_expert_E, in_TR, e,
                             num_ranks, BLOCK=BLOCK_E)
    token_in_rank_TR = in_TR.view(torch.bool)
    position_TR = torch.where(token_in_rank_TR, token_in_rank_TR.cumsum(0) - 1, -1)
    return Layout(token_in_rank_TR, position_TR, token_in_rank_TR.sum(0),
                  routing_map_TE.sum(0))


def permute(x_TH, layout):
    t, h = x_TH.shape
    out = x_TH.new_empty(layout.num_rows, h)
    if out.numel():
        block = _block(h)
        _permute_kernel[(t, triton.cdiv(h, block))](
            x_TH, layout.position_TR.contiguous(), layout.offset_R.contiguous(), out,
            layout.num_ranks, h, BLOCK=block)
    return out


def unpermute_combine(rows_NH, layout, weight_TR, num_tokens):
    h = rows_NH.shape[1]
    out = rows_NH.new_empty(num_tokens, h)
    if not out.numel():
        return out
    if rows_NH.shape[0] == 0:  # nothing was sent: every token sums to zero
        return out.zero_()
    weight = None if weight_TR is None else weight_TR.to(rows_NH.dtype).contiguous()
    block = _block(h)
    _combine_kernel[(num_tokens, triton.cdiv(h, block))](
        rows_NH, layout.position_TR.contiguous(), layout.offset_R.contiguous(),
        rows_NH if weight is None else weight, out, layout.num_ranks, h,
        HAS_WEIGHT=weight is not None, BLOCK=block, **_NO_FMA)
    return out


def compact(x_TH, keep_T):
    t, h = x_TH.shape
    dest_T = keep_T.cumsum(0) - 1
    k = int(dest_T[-1]) + 1 if t else 0
    out = x_TH.new_empty(k, h)
    index_K = torch.empty(k, dtype=torch.int64, device=x_TH.device)
    if k:
        block = _block(h)
        # At least one hidden block: block 0 writes the index even for empty rows.
        _compact_kernel[(t, max(1, triton.cdiv(h, block)))](
            x_TH, keep_T.view(torch.uint8), dest_T, out, index_K, h, BLOCK=block)
    return out, index_K


def _register() -> None:
    from epruntime.kernels import register_backend

    register_backend("triton", sys.modules[__name__], unavailable_reason)


_register()
