"""Attention-accumulated modality scores carried through the layers of one forward pass.

SMoES (arXiv 2604.23996): M^(0) is the one-hot input modality; after layer l's attention,
M^(l+1) = (|x_attn| * A M^(l) + |x| * M^(l)) / (|x_attn| + |x|), with A the attention
probabilities averaged over heads, mirroring the residual x^(l+1) = x^(l) + x_attn^(l).

The three inputs are read from megatron-core's own modules by forward hooks (the layer's input
is the residual x, `self_attention`'s output is x_attn, `core_attention.scale_mask_softmax`'s
output is the attention probabilities), so megatron-core's attention is neither copied nor
edited. Each layer's router calls `advance()` to get the scores for its tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from epruntime.runtime import TokenStream
from epruntime.smoes.scores import attention_accumulate, hard_scores


class AttentionModality:
    def __init__(self, tokens: TokenStream, detach: bool = True):
        self.tokens = tokens  # the model's token stream: M^(0) is its input modality
        self.detach = detach
        self.M_BS2: torch.Tensor | None = None
        self._probs_BSS: torch.Tensor | None = None
        self._residual_norm_BS: torch.Tensor | None = None
        self._attn_norm_BS: torch.Tensor | None = None

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def attach(self, layers: nn.ModuleList, moe_pattern: list[int] | None = None) -> None:
        """Hook every megatron-core TransformerLayer of the decoder. `moe_pattern` [layers] (1
        MoE, 0 dense; None: all MoE): a dense layer has no router to call `advance()`, but its
        attention mixes the tokens all the same, so M advances there after the attention."""
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._on_layer_input, with_kwargs=True)
            layer.self_attention.register_forward_hook(self._on_attention_output)
            if moe_pattern is not None and not moe_pattern[index]:
                layer.self_attention.register_forward_hook(self._advance_past_dense_layer)
            softmax = layer.self_attention.core_attention.scale_mask_softmax
            softmax.register_forward_hook(self._on_attention_probs)

    def _on_layer_input(self, layer, args, kwargs) -> None:
        x_SBH = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if layer.layer_number == 1:  # a new forward pass: M^(0) is the input modality
            modality_SB = self.tokens.modality_SB
            if modality_SB is None:
                raise RuntimeError("attention modality scores need the token modality: run them "
                                   "inside the model's forward (TokenStream.forward)")
            self.M_BS2 = hard_scores(modality_SB.T.reshape(-1)).view(*modality_SB.T.shape, 2)
        self._residual_norm_BS = self._keep(x_SBH.norm(dim=-1).T.float())

    def _on_attention_probs(self, module, args, probs_BNSS) -> None:
        self._probs_BSS = self._keep(probs_BNSS.mean(dim=1).float())

    def _on_attention_output(self, module, args, output) -> None:
        x_attn_SBH = output[0] if isinstance(output, tuple) else output
        self._attn_norm_BS = self._keep(x_attn_SBH.norm(dim=-1).T.float())

    def _advance_past_dense_layer(self, module, args, output) -> None:
        self.advance()  # (a forward hook returning a value would replace the attention output)

    def keep_vision_tokens(self, select, num_vision: int) -> None:
        """Token pruning shortened the sequence: the scores of the first `num_vision` (visual)
        positions become `select(M_BP2)` [B, K, 2], the text positions' stay."""
        if self.M_BS2 is None:
            return
        self.M_BS2 = torch.cat([select(self.M_BS2[:, :num_vision]), self.M_BS2[:, num_vision:]],
                               dim=1)

    def advance(self) -> torch.Tensor:
        """M after this layer's attention, [S*B, 2] in megatron's token order (s-major)."""
        if self.M_BS2 is None or self._probs_BSS is None:
            raise RuntimeError("advance() called before the layer's attention ran")
        self.M_BS2 = attention_accumulate(self.M_BS2, self._probs_BSS, self._attn_norm_BS,
                                          self._residual_norm_BS)
        return self.M_BS2.transpose(0, 1).reshape(-1, 2)
