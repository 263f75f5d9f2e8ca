"""Analytic FLOPs of the MoE-VLM forward pass, from the shapes that actually ran.

Counted as 2 x multiply-accumulates of the matmuls (norms, softmax and activations are a few
percent at most and left out), per layer and per modality of the token that does the work:
- attention: QKV projection 2*3*D^2 and output projection 2*D^2 per token, scores Q K^T and
  probs x V 2*2*S*D per query token (megatron-core's unfused attention computes the full S x S
  matrix, causal mask or not);
- router: 2*D*E per token;
- experts: 2*2*D*F per (token, expert) pair actually dispatched (fc1 and fc2 of a non-gated MLP),
  so reduced activation and pruning both show up here; plus, per token, 2*2*D*F_shared of the
  shared experts in an MoE layer, or 2*2*D*F_dense of the MLP in a dense layer (no router there);
- the vision projector and the output layer (over every position, as GPTModel computes it);
- a learned visual-token compressor (epruntime.compress) as its own analytic count.
`full` counts the same batches through the unreduced model (every token, k experts each), which
is what `flops_ratio` divides by.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from epruntime.distributed import host_all_reduce

MODALITIES = ("text", "vision")


class FlopCounter:
    def __init__(self, *, hidden: int, num_layers: int, num_experts: int, topk: int,
                 ffn: int, vocab: int, patch_dim: int, moe_pattern: list[int] | None = None,
                 dense_ffn: int = 0, shared_ffn: int = 0):
        self.d, self.layers, self.e, self.k, self.f = hidden, num_layers, num_experts, topk, ffn
        self.moe = [1] * num_layers if moe_pattern is None else list(moe_pattern)
        self.dense_ffn, self.shared_ffn = dense_ffn, shared_ffn
        self.vocab, self.patch_dim = vocab, patch_dim
        self.reset()

    def reset(self) -> None:
        # [layer, {attention, router, experts}, modality]
        self.layer_LCM = torch.zeros(self.layers, 3, 2, dtype=torch.float64)
        self.full_LCM = torch.zeros(self.layers, 3, 2, dtype=torch.float64)
        # projector, output layer, token compressor (as run)
        self.other = torch.zeros(3, dtype=torch.float64)
        self.full_other = torch.zeros(3, dtype=torch.float64)

    def per_token_attention(self, seq: int) -> float:
        return 8 * self.d * self.d + 4 * seq * self.d

    def _layer(self, out, layer: int, tokens_M: torch.Tensor, seq: int) -> None:
        out[layer, 0] += tokens_M * self.per_token_attention(seq)
        if self.moe[layer]:
            out[layer, 1] += tokens_M * 2 * self.d * self.e
        # every token's MLP outside the routed experts: shared experts, or the dense MLP
        out[layer, 2] += tokens_M * 4 * self.d * (self.shared_ffn if self.moe[layer]
                                                  else self.dense_ffn)

    def on_batch(self, batch: int, num_vision: int, seq: int) -> None:
        """A forward pass starts: count the full model's work for it analytically."""
        tokens_M = torch.tensor([batch * (seq - num_vision), batch * num_vision],
                                dtype=torch.float64)
        for layer in range(self.layers):
            self._layer(self.full_LCM, layer, tokens_M, seq)
            if self.moe[layer]:
                self.full_LCM[layer, 2] += tokens_M * self.k * 4 * self.d * self.f
        projector = batch * num_vision * 2 * (self.patch_dim * self.d + self.d * self.d)
        head = batch * seq * 2 * self.d * self.vocab
        self.full_other += torch.tensor([projector, head, 0.0], dtype=torch.float64)
        self.other[0] += projector

    def on_layer(self, layer: int, modality_SB: torch.Tensor) -> None:
        """Layer `layer` runs attention and routing on these tokens."""
        tokens_M = torch.bincount(modality_SB.reshape(-1).cpu(), minlength=2).double()
        self._layer(self.layer_LCM, layer, tokens_M, modality_SB.shape[0])

    def on_experts(self, layer: int, pairs_M: torch.Tensor) -> None:
        """[2] (token, expert) pairs routed by text and by visual tokens in `layer`."""
        self.layer_LCM[layer, 2] += pairs_M.double().cpu() * 4 * self.d * self.f

    def on_module(self, flops: float) -> None:
        """A learned visual-token compressor ran (the full model has none)."""
        self.other[2] += flops

    def on_output(self, batch: int, seq: int) -> None:
        self.other[1] += batch * seq * 2 * self.d * self.vocab

    def summary(self, group=None) -> dict:
        """Totals over the ranks of `group` (collective when distributed)."""
        flat = torch.cat([self.layer_LCM.flatten(), self.full_LCM.flatten(), self.other,
                          self.full_other])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            host_all_reduce(flat, group=group)
        n = self.layers * 6
        layer_LCM, full_LCM = flat[:n].view(self.layers, 3, 2), flat[n:2 * n].view(self.layers, 3, 2)
        other, full_other = flat[2 * n:2 * n + 3], flat[2 * n + 3:]
        per_layer = [{
            "layer": i,
            **{part: dict(zip(MODALITIES, layer_LCM[i, c].tolist()))
               for c, part in enumerate(("attention", "router", "experts"))},
            "total": layer_LCM[i].sum().item(),
            "full": full_LCM[i].sum().item(),
        } for i in range(self.layers)]
        total = layer_LCM.sum().item() + other.sum().item()
        full = full_LCM.sum().item() + full_other.sum().item()
        by_modality = layer_LCM.sum(dim=(0, 1))
        return {"total": total, "full": full,
                "ratio": total / full if full else 1.0,
                "by_modality": dict(zip(MODALITIES, by_modality.tolist())),
                "projector": other[0].item(), "output_layer": other[1].item(),
                "token_compressor": other[2].item(),
                "per_layer": per_layer}
