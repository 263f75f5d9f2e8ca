"""Dual-modality expert skipping (MoDES, arXiv 2511.15690): which of a token's top-k (token,
expert) pairs are not dispatched.

MoDES's globally-modulated local gating scores every routed pair of layer l as
s = alpha[l, m] x pi, with pi the pair's routing weight and alpha[l, m] the layer's global
importance for the token's modality m (calibrated offline, epruntime.modes.calibrate). Its
dual-modality thresholding skips the pair when s < tau_m: tau_text for text tokens, tau_vision
for visual tokens. The paper zeroes the skipped experts' weights and leaves the others as they
were; we do the same: the remaining weights are NOT renormalised, so a token whose every expert
is skipped passes its residual stream through the layer unchanged. (The public implementation,
ModelTC/MoDES models/qwen3.py, masks the weights to 0 after its own top-k normalisation and
does not rescale.)

Skipped pairs are removed from the routing map before the dispatcher, so the dispatchers, the
CommLedger and the FLOPs counter all see only the pairs that run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from epruntime.config import ModesConfig
from epruntime.modality import TEXT, VISION
from epruntime.model.routing_hooks import RouterCall
from epruntime.runtime import TokenStream

MODALITIES = ("text", "vision")  # index = the modality id (epruntime.modality)


def skip_pairs(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, modality_T: torch.Tensor,
               alpha_2: torch.Tensor, threshold_2: torch.Tensor) -> torch.Tensor:
    """[T, E] bool: the routed pairs whose score alpha[m] x weight is under threshold[m].

    probs_TE [T, E] routing weights (0 off the map), routing_map_TE [T, E] bool, modality_T [T]
    int (0 text, 1 vision), alpha_2 [2] and threshold_2 [2] float: this layer's importance and
    the thresholds, indexed by modality. A threshold of 0 skips nothing (scores are >= 0).
    """
    score_TE = alpha_2[modality_T][:, None] * probs_TE
    return routing_map_TE & (score_TE < threshold_2[modality_T][:, None])


def drop_pairs(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, skip_TE: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing without the pairs in `skip_TE`: (probs [T, E] with 0 there, map [T, E]).
    The other weights stay as they are (no renormalisation, as MoDES)."""
    return probs_TE.masked_fill(skip_TE, 0.0), routing_map_TE & ~skip_TE


class ExpertSkipper:
    """Per-model state of MoDES skipping: alpha [L, 2], the thresholds [2], and device-side
    counts of the pairs routed and skipped per (layer, modality). Routers reach it through
    `adjust_routing`, one of their routing hooks (epruntime.model.routing_hooks); it acts in
    eval mode only.

    `removing(layer, modality)` (calibration) skips every pair of that modality in that layer:
    what the layer's experts contribute to those tokens, removed.
    """

    def __init__(self, cfg: ModesConfig, num_layers: int, tokens: TokenStream,
                 alpha_L2: torch.Tensor | None = None, thresholds: tuple[float, float] = (0., 0.)):
        self.num_layers, self.tokens = num_layers, tokens
        self.configure(cfg.enabled, alpha_L2, thresholds)
        self._removing: tuple[int, int] | None = None
        self._on_device: dict = {}
        self.reset_stats()

    def configure(self, enabled: bool, alpha_L2: torch.Tensor | None = None,
                  thresholds: tuple[float, float] | None = None) -> None:
        """Switch skipping on or off, set alpha (None: ones) and the (text, vision) thresholds
        (None: keep them); takes effect on the next forward pass."""
        if alpha_L2 is None:
            alpha_L2 = torch.ones(self.num_layers, 2, dtype=torch.float64)
        if tuple(alpha_L2.shape) != (self.num_layers, 2):
            raise ValueError(f"alpha has shape {tuple(alpha_L2.shape)}, expected "
                             f"[{self.num_layers}, 2] (layers x text/vision)")
        self.enabled = enabled
        self.alpha_L2 = alpha_L2.double().cpu()
        if thresholds is not None:
            t = [float(v) for v in thresholds]
            if len(t) != 2 or not all(0 <= v <= 1 for v in t):
                raise ValueError(f"thresholds {thresholds}: expected (text, vision), each in "
                                 "[0, 1]")
            self.thresholds = tuple(t)
        self._on_device = {}

    @property
    def active(self) -> bool:
        return self.enabled or self._removing is not None

    @contextlib.contextmanager
    def removing(self, layer: int, modality: int) -> Iterator[None]:
        """Within the block, layer `layer` dispatches no pair of tokens of `modality` (eval)."""
        if not 0 <= layer < self.num_layers or modality not in (TEXT, VISION):
            raise ValueError(f"removing(layer={layer}, modality={modality}): expected a layer "
                             f"in 0..{self.num_layers - 1} and a modality 0 or 1")
        saved, self._removing = self._removing, (layer, modality)
        try:
            yield
        finally:
            self._removing = saved

    def reset_stats(self) -> None:
        # [L, {routed, skipped}, modality]; created on the routing's device at first use
        self.pairs_LC2: torch.Tensor | None = None
        self.max_weight_L2: torch.Tensor | None = None

    def _tensors(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:  # one small copy per device and configuration
            self._on_device[device] = (
                self.alpha_L2.to(device, torch.float32),
                torch.tensor(self.thresholds, dtype=torch.float32, device=device))
        alpha_L2, threshold_2 = self._on_device[device]
        return alpha_L2[layer], threshold_2

    def adjust_routing(self, call: RouterCall, probs_TE: torch.Tensor,
                       routing_map_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A routing hook of the model's routers (epruntime.model.routing_hooks): the routing
        `on_routing` leaves, in eval mode while skipping is on; else the routing unchanged."""
        if call.router.training or not self.active:
            return probs_TE, routing_map_TE
        return self.on_routing(call.layer, probs_TE, routing_map_TE)

    def on_routing(self, layer: int, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s routing as it will be dispatched (eval mode): counts the pairs routed
        per modality, then drops the skipped ones."""
        modality_T = self.tokens.modality_T
        if modality_T is None:
            raise RuntimeError("MoDES skipping needs the token modality: run the router inside "
                               "the model's forward (TokenStream.forward)")
        modality_T = modality_T.to(routing_map_TE.device)
        if self._removing is not None:
            removed_layer, removed_modality = self._removing
            skip_TE = routing_map_TE & (modality_T == removed_modality)[:, None]
            skip_TE &= layer == removed_layer
        elif self.enabled:
            alpha_2, threshold_2 = self._tensors(layer, routing_map_TE.device)
            skip_TE = skip_pairs(probs_TE.float(), routing_map_TE, modality_T, alpha_2,
                                 threshold_2)
        else:
            return probs_TE, routing_map_TE
        self._count(layer, probs_TE, routing_map_TE, skip_TE, modality_T)
        return drop_pairs(probs_TE, routing_map_TE, skip_TE)

    def _count(self, layer, probs_TE, routing_map_TE, skip_TE, modality_T) -> None:
        """Pairs routed and skipped per modality, and the largest routing weight per modality
        (the calibration's threshold range): device tensors, no host sync."""
        device = routing_map_TE.device
        if self.pairs_LC2 is None:
            self.pairs_LC2 = torch.zeros(self.num_layers, 2, 2, dtype=torch.int64, device=device)
            self.max_weight_L2 = torch.zeros(self.num_layers, 2, dtype=torch.float32,
                                             device=device)
        counts_2T = torch.stack([routing_map_TE.sum(1), skip_TE.sum(1)])
        self.pairs_LC2[layer].index_add_(1, modality_T, counts_2T)
        weight_T = probs_TE.detach().float().masked_fill(~routing_map_TE, 0).amax(1)
        self.max_weight_L2[layer].scatter_reduce_(0, modality_T, weight_T, "amax")

    def totals(self, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """([L, {routed, skipped}, 2] int64, [L, 2] max routing weight) summed / maxed over the
        ranks of `group` (collective when distributed), on the host."""
        import torch.distributed as dist

        from epruntime.distributed import host_all_reduce

        pairs = (torch.zeros(self.num_layers, 2, 2, dtype=torch.int64) if self.pairs_LC2 is None
                 else self.pairs_LC2.cpu())  # host sync: the read-out
        weight = (torch.zeros(self.num_layers, 2) if self.max_weight_L2 is None
                  else self.max_weight_L2.cpu())
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            host_all_reduce(pairs, group=group)
            host_all_reduce(weight, group=group, op=dist.ReduceOp.MAX)
        return pairs, weight

    def summary(self, group=None) -> dict:
        """Skip ratios since the last `reset_stats` over the ranks of `group` (collective)."""
        pairs, _ = self.totals(group)
        routed_2, skipped_2 = pairs.sum(0)
        return {"enabled": self.enabled, "text_threshold": self.thresholds[0],
                "vision_threshold": self.thresholds[1],
                "routed_pairs": int(routed_2.sum()), "skipped_pairs": int(skipped_2.sum()),
                "skip_ratio": skip_ratio(pairs),
                **{f"{m}_skip_ratio": (float(skipped_2[i]) / float(routed_2[i])
                                       if routed_2[i] else 0.0)
                   for i, m in enumerate(MODALITIES)},
                "per_layer": [{"layer": layer, **{
                    f"{m}_skipped": int(pairs[layer, 1, i]) for i, m in enumerate(MODALITIES)},
                    **{f"{m}_routed": int(pairs[layer, 0, i]) for i, m in enumerate(MODALITIES)}}
                    for layer in range(self.num_layers)]}


def skip_ratio(pairs_LC2: torch.Tensor) -> float:
    """Skipped over routed (token, expert) pairs, all layers and modalities: [L, 2, 2] -> float."""
    routed, skipped = pairs_LC2.sum(dim=(0, 2)).tolist()
    return skipped / routed if routed else 0.0
