"""Build and evaluate a learned-compression variant from a trained full checkpoint: what the
reducers benchmark calls on its ranks (collective: every rank of the job calls each function).

    engine = variant_engine(base_cfg, env, vocab..., learnpruner={...} or qmop={...})
    load_base_weights(engine, base_checkpoint)    # the full model's weights; module at its init
    finetune(engine, batches, steps)              # N optimizer steps with the module on
    row = evaluate_variant(engine, eval_ds, full) # accuracy, retention, FLOPs ratio, tokens kept

Cost: fine-tuning is ordinary training of the whole model with the module on (the visual
sequence shrinks to the budget, so a step costs somewhat less than a full-model step), plus
building one extra engine to read the base checkpoint; `finetune(..., steps=0)` evaluates the
module at its initialisation (an untrained scorer/router: a control, not the method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from epruntime.config import Config, config_from_dict
from epruntime.model.sharding import is_expert_param


class BaseCheckpointError(ValueError):
    """The base checkpoint does not fit the variant (names what is missing or extra)."""


def variant_config(base: Config, **sections: dict[str, Any]) -> Config:
    """`base` with the `learnpruner` / `qmop` (/ `fastmmoe`) sections replaced by `sections`
    (validated: a bad budget is a ConfigError naming the field)."""
    raw = base.model_dump(mode="json")
    for name, section in sections.items():
        raw[name] = section
    return config_from_dict(raw)


METHODS = ("learnpruner", "learnpruner-s1", "qmop")


def method_sections(method: str, budget: float, stage2_retention: float = 0.25) -> dict:
    """Config sections of a variant: `learnpruner` (stage 1 keeps `budget`, stage 2 keeps
    `stage2_retention` of those), `learnpruner-s1` (stage 1 only) or `qmop` at `budget`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "qmop":
        return {"qmop": {"enabled": True, "budget": budget}}
    return {"learnpruner": {"enabled": True, "budget": budget,
                            "stage2": method == "learnpruner",
                            "stage2_retention": stage2_retention}}


def variant_engine(cfg: Config, env, text_vocab_size: int, num_answers: int,
                   max_question_len: int):
    from epruntime.engine import Engine

    return Engine(cfg, env, text_vocab_size, num_answers, max_question_len)


@torch.no_grad()
def load_base_weights(engine, path: str | Path) -> list[str]:
    """Collective. Load a full (uncompressed) checkpoint into `engine`'s model: every tensor the
    full model has comes from the checkpoint, the compressor keeps its initialisation. Returns
    the names left at their initialisation (the compressor's). The optimizer starts fresh."""
    from epruntime import checkpoint as ckpt
    from epruntime.engine import Engine

    path = ckpt.resolve_checkpoint(path)
    base_cfg = variant_config(engine.cfg, learnpruner={}, qmop={})  # the full model
    m = engine.model
    base = Engine(base_cfg, engine.env, m.text_vocab_size, m.num_answers, m.max_question_len)
    ckpt.load_checkpoint(base, path, restore_training_state=False)
    engine.model.set_placements(base.model.placements)
    ep_rank = engine.env.ep_rank
    mine = dict(engine.model.global_named_parameters(ep_rank))
    mine.update(engine.model.global_named_buffers(ep_rank))
    theirs = dict(base.model.global_named_parameters(ep_rank))
    theirs.update(base.model.global_named_buffers(ep_rank))
    missing = sorted(set(theirs) - set(mine))
    if missing:
        raise BaseCheckpointError(f"{path}: the variant model lacks {missing[:3]} (is the "
                                  "checkpoint's model section the same?)")
    for name, t in theirs.items():
        mine[name].copy_(t)
    return sorted(set(mine) - set(theirs))


def finetune(engine, batches, steps: int, first_step: int = 0) -> list[float]:
    """`steps` optimizer steps with the compressor on (the engine's LR schedule from
    `first_step`); returns the global-batch losses."""
    losses = []
    for step in range(first_step, first_step + steps):
        losses.append(engine.train_step(next(batches).to(engine.env.device), step).loss)
    return losses


def evaluate_variant(engine, dataset, full: dict | None = None,
                     batch_size: int | None = None) -> dict:
    """Collective. One benchmark row: accuracy, retention against `full` (a row from this
    function for the full model; None: this is the full model), FLOPs ratio (the module's own
    cost included), visual tokens kept, prefill tokens/s, cross-rank bytes."""
    m = engine.evaluate(dataset, batch_size)
    acc = m["eval_accuracy"]
    return {"eval_accuracy": acc,
            "accuracy_retention": acc / full["eval_accuracy"] if full and full["eval_accuracy"]
            else 1.0,
            "flops": m["flops"]["total"], "flops_ratio": m["flops_ratio"],
            "token_compressor_flops": m["flops"]["token_compressor"],
            "vision_tokens": m["vision_tokens"], "vision_tokens_kept": m["vision_tokens_kept"],
            "prefill_tokens_per_s": m["prefill_tokens_per_s"],
            "cross_rank_bytes": (m["comm"] or {}).get("cross_rank_bytes")}


def compressor_param_names(model) -> list[str]:
    """Names of the compressor's parameters: dense (never expert-sharded), so they are
    replicated and their gradients reduced over data parallel like the attention's."""
    return [n for n, _ in model.named_parameters()
            if n.startswith("compressor.") and not is_expert_param(n)]
