"""Learned visual-token compression between the projector and the language model (issue 17):
LearnPruner's stage 1 (`learnpruner:`) and QMoP (`qmop:`), trained with the model, one path
through MoEVLM for both (epruntime.model.vlm). `finetune` turns a trained full checkpoint into
a compressed variant and evaluates it (what the reducers benchmark calls)."""

from __future__ import annotations

from torch import nn

from epruntime.compress.learnpruner import LearnPrunerStage1
from epruntime.compress.output import Compressed
from epruntime.compress.qmop import QMoP
from epruntime.config import Config, FastMMoEConfig

__all__ = ["Compressed", "LearnPrunerStage1", "QMoP", "build_compressor", "reducer_config"]


def build_compressor(cfg: Config) -> nn.Module | None:
    """The configured compressor, or None (no compression; QMoP at the full budget too)."""
    m = cfg.model
    p = m.num_vision_tokens
    if cfg.learnpruner.enabled:
        lp = cfg.learnpruner
        return LearnPrunerStage1(m.hidden_size, p, lp.keep(p), lp.diversity, lp.scorer_hidden)
    if cfg.qmop.enabled and cfg.qmop.keep(p) < p:
        q = cfg.qmop
        return QMoP(m.hidden_size, p, q.keep(p), q.resampler_heads, q.router_topk)
    return None


def reducer_config(cfg: Config) -> FastMMoEConfig:
    """The token reducer's section: LearnPruner's stage 2 (text-to-vision attention pruning
    after a middle layer) when learnpruner.stage2, else `fastmmoe` as configured."""
    lp = cfg.learnpruner
    if not (lp.enabled and lp.stage2):
        return cfg.fastmmoe
    layer = lp.stage2_layer if lp.stage2_layer is not None else (cfg.model.num_layers - 1) // 2
    return FastMMoEConfig(enabled=True, policy="text2vision", layers=[layer],
                          retention=lp.stage2_retention)
