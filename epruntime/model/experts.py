"""A rank's local experts run as two grouped GEMMs instead of one small MLP call per expert.

megatron-core's SequentialMLP calls each local expert's MLP in turn: at the tiny config's shapes
(16 local experts, ~200 rows of width 64 each) a step spends most of its expert time in the
Python and autograd overhead of 16 x (fc1, activation, fc2) forward and backward, not in the
multiply-adds. `GroupedLocalExperts` keeps SequentialMLP's parameters exactly as they are (one
`local_experts[slot].linear_fc1/linear_fc2` per expert: the same names, initialisation,
checkpoints, DDP buffers and live migration) and computes all experts at once with
`torch._grouped_mm` over the stacked weights; its CPU kernel multiplies each expert's rows by
that expert's weights as the per-expert matmuls do (the same result, bit for bit, in
`tests/test_experts.py`). Where the grouped path does not apply (CUDA, where TE's or
megatron-core's grouped GEMM are the choice; fp8; tensor-parallel experts; biases; shapes the
kernel's 16-byte stride rule refuses) it is SequentialMLP's own loop.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


class _ContiguousGrad(torch.autograd.Function):
    """Identity on the grouped GEMM's output whose backward hands the GEMM a contiguous
    gradient: its backward refuses expanded (stride-0) gradients, e.g. the gradient of a sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear(x_RH: torch.Tensor, weight_EOH: torch.Tensor,
                   offsets_E: torch.Tensor) -> torch.Tensor:
    """Row block e of `x_RH` times expert e's weight, transposed as nn.Linear stores it.

    x_RH: [R, H], rows grouped by expert (expert e's rows end at offsets_E[e]);
    weight_EOH: [E, O, H], expert e's [out, in] weight; offsets_E: [E] int32 cumulative row
    counts (offsets_E[-1] == R). Returns [R, O]."""
    out_RO = torch._grouped_mm(x_RH, weight_EOH.transpose(1, 2), offs=offsets_E)
    return _ContiguousGrad.apply(out_RO)


def grouped_path_refusal(config, tp_size: int) -> str | None:
    """Why the grouped path cannot run experts of this config (None: it can, on CPU tensors)."""
    if config.fp8 or getattr(config, "fp4", None):
        return "fp8/fp4 experts"
    if tp_size != 1:
        return f"tensor-parallel experts (expert TP size {tp_size})"
    if config.add_bias_linear:
        return "expert biases (add_bias_linear=True)"
    if config.moe_apply_probs_on_input:
        return "moe_apply_probs_on_input=True"
    if config.use_te_activation_func or config.bias_activation_fusion:
        return "fused or TE activations"
    if config.activation_func_clamp_value is not None:
        return "a clamped gated activation"
    widths = [config.hidden_size, config.moe_ffn_hidden_size]
    if config.gated_linear_unit:
        widths.append(2 * config.moe_ffn_hidden_size)
    elem = torch.tensor([], dtype=config.params_dtype).element_size()
    if any(w * elem % 16 for w in widths):
        return f"row widths {widths} x {elem} bytes not multiples of 16 bytes (the kernel's rule)"
    return None


class GroupedLocalExperts(SequentialMLP):
    """SequentialMLP whose forward runs every local expert in two grouped GEMMs (CPU)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.refusal = grouped_path_refusal(self.config, self.tp_group.size())

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        """permuted_local_hidden_states: [R, H] rows grouped by local expert;
        tokens_per_expert: [E] rows per local expert; permuted_probs: [R] each row's routing
        weight. Returns ([R, H], None) as SequentialMLP does."""
        if (self.refusal is not None or self.num_local_experts == 1
                or permuted_local_hidden_states.device.type != "cpu"):
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        counts_E = torch.as_tensor(tokens_per_expert, device=permuted_local_hidden_states.device)
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        fc1_EFH = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        fc2_EHF = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        inter_RF = grouped_linear(permuted_local_hidden_states, fc1_EFH, offsets_E)
        inter_RF = self._activation(inter_RF)
        # The routing weight scales the activation, as megatron-core's MLP does for experts.
        dtype = inter_RF.dtype
        inter_RF = (inter_RF * permuted_probs.unsqueeze(-1)).to(dtype)
        return grouped_linear(inter_RF, fc2_EHF, offsets_E), None

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        """megatron-core MLP's unfused activation (GLU halves when gated)."""
        act = self.config.activation_func
        if not self.config.gated_linear_unit:
            return act(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        return act(x_glu) * (x_linear + self.config.glu_linear_offset)
