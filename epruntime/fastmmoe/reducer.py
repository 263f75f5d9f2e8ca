"""TokenReducer: reduced visual expert activation and token pruning between megatron-core's layers.

The model's forward (`MoEVLM.decode`) runs megatron-core's decoder layers one by one on an
explicit `TokenState` and calls the reducer around each; inside a layer, a hook on megatron-core's
attention softmax and the layer's router (a routing hook, epruntime.model.routing_hooks) hand it
what only the layer computes:

    before layer l     (model loop)  count attention/router FLOPs for the tokens present
    attention softmax  (hook)        at an attention-policy pruning layer, keep the head-mean probs
    routing            (router)      visual tokens keep their top-k' experts; at a pruning layer the
                                     policy picks the visual tokens that stay (from this layer's
                                     routing softmax or attention), and in drop mode the others
                                     skip this layer's experts; count the expert pairs that run
    after layer l      (model loop)  at a pruning layer: hidden [S, B, H] -> [S', B, H] (drop, or
                                     merge into the closest kept token); the state's modality, the
                                     SMoES attention scores and the visual-token count shrink with it

Visual tokens stay first and text tokens are never touched, so the causal mask (built by the
attention for the current length) and the relative order stay right, and the answer position
is `num_vision + question_len - 1`. Positions are learned absolute embeddings added at the
input, so kept tokens carry theirs. Reduction and pruning apply in eval mode only (FastMMoE is
training-free); FLOPs are counted in eval mode whether or not anything is reduced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from epruntime.config import FastMMoEConfig
from epruntime.fastmmoe.activation import reduce_topk
from epruntime.fastmmoe.flops import FlopCounter
from epruntime.fastmmoe.policies import Observation, build_policy
from epruntime.model.routing_hooks import RouterCall
from epruntime.modality import TEXT, VISION
from epruntime.runtime import TokenStream


@dataclass(frozen=True)
class TokenState:
    """The tokens flowing from one decoder layer to the next."""

    hidden_SBH: torch.Tensor  # [S, B, H]
    modality_SB: torch.Tensor  # [S, B] (0 text, 1 vision): visual tokens first
    num_vision: int  # visual tokens per sample (the first num_vision positions)


class TokenReducer:
    def __init__(self, cfg: FastMMoEConfig, topk: int, num_layers: int, tokens: TokenStream,
                 flops: FlopCounter | None = None, attention_modality=None,
                 kernels: str | None = None):
        self.topk, self.num_layers, self.flops = topk, num_layers, flops
        self.tokens = tokens  # the model's token stream: pruning shortens it
        self.attention_modality = attention_modality  # SMoES scores to shrink with the tokens
        self.kernels = kernels  # epruntime.kernels backend of compact (None: automatic)
        self.configure(cfg)
        self.active = False
        self.num_vision = 0
        self.query_valid_BS: torch.Tensor | None = None
        self._selection: tuple | None = None  # (keep, keep_BP, merge_into_BP) until layer output
        self._attention_BSS: torch.Tensor | None = None
        self.last_kept: dict[int, torch.Tensor] = {}  # layer -> [B, K] kept, in the last pass
        self.kept_vision = 0  # visual tokens per sample that reached the output, summed over passes
        self.passes = 0  # samples that went through (the denominator of kept_vision)
        # Host seconds spent choosing tokens (the policy's inputs and its selection), summed over
        # passes: exact on CPU; on CUDA it is launch time, as nothing here waits for the device.
        self.selection_s = 0.0

    def configure(self, cfg: FastMMoEConfig) -> None:
        """Switch policy, layers, k' or retention between passes (the same model and hooks)."""
        cfg.check_layers(self.num_layers)
        self.cfg = cfg
        self.policy = (build_policy(cfg.policy, cfg.similarity, self.kernels) if cfg.enabled
                       else None)

    def _prunes(self, index: int) -> bool:
        return self.policy is not None and self.cfg.retention_at(index) is not None

    # ---- wiring ----------------------------------------------------------------------------
    def attach(self, layers) -> None:
        """Hook the attention softmax of every megatron-core TransformerLayer of the decoder (the
        routers reach the reducer themselves: epruntime.model.routing_hooks); the hook reads the
        current configuration, so `configure` takes effect on the next pass."""
        for index, layer in enumerate(layers):
            softmax = layer.self_attention.core_attention.scale_mask_softmax
            softmax.register_forward_hook(self._attention_probs(index))

    def begin(self, training: bool, question_lens: torch.Tensor, num_vision: int,
              seq: int, full_vision: int | None = None, module_flops: float = 0.0) -> None:
        """A forward pass starts on B samples of `num_vision` visual + question tokens; a
        learned compressor (epruntime.compress) may have cut the model's `full_vision` visual
        tokens to `num_vision` at a cost of `module_flops`."""
        self.active = not training
        self.last_kept = {}
        self.num_vision = num_vision
        b, q = question_lens.shape[0], seq - num_vision
        text_valid_BQ = torch.arange(q, device=question_lens.device)[None] < question_lens[:, None]
        self.query_valid_BS = torch.cat([text_valid_BQ.new_ones(b, num_vision), text_valid_BQ], 1)
        if self.active and self.flops is not None:
            full = full_vision or num_vision
            self.flops.on_batch(b, full, seq - num_vision + full)
            self.flops.on_module(module_flops)

    def end(self, batch: int, seq: int) -> int:
        """The pass is over; returns the visual tokens per sample that reached the output."""
        if self.active:
            self.kept_vision += self.num_vision * batch
            self.passes += batch
            if self.flops is not None:
                self.flops.on_output(batch, seq)
        self.abort()
        return self.num_vision

    def abort(self) -> None:
        self.active = False
        self._selection = self._attention_BSS = None

    def reset_stats(self) -> None:
        self.kept_vision = self.passes = 0
        self.selection_s = 0.0
        if self.flops is not None:
            self.flops.reset()

    # ---- between layers (called by the model's layer loop) -----------------------------------
    def before_layer(self, index: int, modality_SB: torch.Tensor) -> None:
        if self.active and self.flops is not None:
            self.flops.on_layer(index, modality_SB)

    def after_layer(self, index: int, state: TokenState) -> TokenState:
        """At a pruning layer, the state of the kept tokens; else `state` as it is."""
        if not self.active or not self._prunes(index) or self._selection is None:
            return state
        hidden_SBH, modality_SB = self.prune(state.hidden_SBH, *self._selection)
        self._selection = None
        self._attention_BSS = None
        return TokenState(hidden_SBH, modality_SB, self.num_vision)

    # ---- hooks -----------------------------------------------------------------------------

    def adjust_routing(self, call: RouterCall, probs_TE: torch.Tensor, map_TE: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing of layer `call.layer` as it is dispatched (a routing hook of the model's
        routers, epruntime.model.routing_hooks): in eval mode, visual tokens keep their top-k'
        experts, and at a pruning layer the policy picks the visual tokens that stay; FLOPs of
        the (token, expert) pairs that run."""
        if not self.active:
            return probs_TE, map_TE
        index, router, hidden_SBH = call.layer, call.router, call.hidden_SBH
        modality_T = self.tokens.modality_T.to(map_TE.device)
        if self.cfg.enabled:
            k_reduced = self.cfg.vision_topk_at(index, self.topk)
            if k_reduced < self.topk:
                probs_TE, map_TE = reduce_topk(probs_TE, map_TE, modality_T == VISION, k_reduced)
            if self._prunes(index):
                probs_TE, map_TE = self._select(router, hidden_SBH, self.cfg.retention_at(index),
                                                probs_TE, map_TE)
        if self.flops is not None:  # host sync (eval only): FLOPs are counted on the host
            pairs_M = torch.zeros(2, dtype=torch.float64)
            pairs_M.index_add_(0, modality_T.cpu(), map_TE.sum(1).cpu().double())
            self.flops.on_experts(index, pairs_M)
        return probs_TE, map_TE

    def _attention_probs(self, index: int):
        def hook(module, args, probs_BNSS):
            if self.active and self._prunes(index) and self.policy.needs_attention:
                self._attention_BSS = probs_BNSS.mean(dim=1)
        return hook

    def _select(self, router, hidden_SBH, retention, probs_TE, map_TE):
        """At a pruning layer, after attention and routing: choose the visual tokens that stay.
        In drop mode the others skip this layer's experts too (they leave at its output, so
        their expert output would be discarded): their routing rows are cleared."""
        start = time.perf_counter()
        s, b = hidden_SBH.shape[:2]
        p = self.num_vision
        routing_BPE = None
        if self.policy.needs_routing:
            logits = router.gating(hidden_SBH).reshape(s, b, -1)
            routing_BPE = torch.softmax(logits[:p].float(), dim=-1).transpose(0, 1)
        obs = Observation(p, self.query_valid_BS, routing_BPE, self._attention_BSS)
        keep = int(round(retention * p))
        sel = self.policy.select(obs, keep, merge=self.cfg.mode == "merge")
        if sel.keep_BK.shape != (b, keep):
            raise RuntimeError(f"policy {self.policy.name} kept {tuple(sel.keep_BK.shape)} "
                               f"tokens, expected ({b}, {keep})")
        keep_BP = torch.zeros(b, p, dtype=torch.bool, device=hidden_SBH.device)
        keep_BP.scatter_(1, sel.keep_BK.to(keep_BP.device), True)
        self._selection = (keep, keep_BP, sel.merge_into_BP)
        self.last_kept[router.layer_number - 1] = sel.keep_BK
        self.selection_s += time.perf_counter() - start
        if sel.merge_into_BP is None and not bool(keep_BP.all()):
            # Tokens are s-major ([S, B] flattened): position s of sample b is row s * B + b.
            skip_T = torch.cat([~keep_BP.T, keep_BP.new_zeros(s - p, b)]).reshape(-1)
            map_TE = map_TE & ~skip_T[:, None]
            probs_TE = probs_TE * map_TE
        return probs_TE, map_TE

    # ---- pruning ---------------------------------------------------------------------------
    def prune(self, hidden_SBH: torch.Tensor, keep: int, keep_BP: torch.Tensor,
              merge_into_BP: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, B, H] -> ([S', B, H], modality [S', B]), S' = keep + text: the selected visual
        tokens (or the means of the groups merged into them) in their order, then the text
        tokens untouched."""
        from epruntime.kernels import compact

        p, (s, b, h) = self.num_vision, hidden_SBH.shape
        merge = merge_into_BP is not None
        vision_BPH = hidden_SBH[:p].transpose(0, 1)
        if merge:
            vision_BKH = merge_rows(vision_BPH, merge_into_BP, keep)
        else:
            vision_BKH = compact(vision_BPH.reshape(b * p, h), keep_BP.reshape(-1),
                                 self.kernels)[0].view(b, keep, h)
        pruned_SBH = torch.cat([vision_BKH.transpose(0, 1), hidden_SBH[p:]], dim=0).contiguous()

        text = s - p
        self.query_valid_BS = torch.cat([keep_BP.new_ones(b, keep), self.query_valid_BS[:, p:]], 1)
        dev = hidden_SBH.device
        modality_S = torch.cat([torch.full((keep,), VISION, device=dev),
                                torch.full((text,), TEXT, device=dev)])
        modality_SB = modality_S[:, None].expand(keep + text, b)
        if self.attention_modality is not None:  # SMoES scores follow the tokens they score
            self.attention_modality.keep_vision_tokens(
                lambda m_BP2: (merge_rows(m_BP2, merge_into_BP, keep) if merge
                               else m_BP2[keep_BP].view(b, keep, m_BP2.shape[-1])), p)
        self.num_vision = keep
        return pruned_SBH, modality_SB


def merge_rows(x_BPC: torch.Tensor, into_BP: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, P, C] -> [B, K, C]: mean of the rows that join each kept slot (`into_BP` in 0..K-1)."""
    b, p, c = x_BPC.shape
    sums = x_BPC.new_zeros(b, keep, c).scatter_add_(1, into_BP[:, :, None].expand(b, p, c), x_BPC)
    counts = torch.zeros(b, keep, dtype=x_BPC.dtype, device=x_BPC.device)
    counts.scatter_add_(1, into_BP, torch.ones(b, p, dtype=x_BPC.dtype, device=x_BPC.device))
    return sums / counts[:, :, None]
