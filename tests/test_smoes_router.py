"""SMoESRouter inside the real model on real ranks: the baseline it must reduce to, state that
must agree across ranks and survive a checkpoint, and its losses reaching the router."""

from __future__ import annotations

import torch

from tests import configs
from tests.dist import spawn

GLOBAL_BATCH = 8


def config(ep_size: int, *extra: str):
    return configs.small_config(f"parallel.ep_size={ep_size}", "smoes.rebin_interval=2", *extra)


def _train(cfg, env, steps: int):
    from epruntime.data import ShardedBatchIterator, SyntheticVQA
    from epruntime.engine import Engine
    from epruntime.placement.controller import PlacementController

    ds = SyntheticVQA(256, image_size=16, question_len=6, seed=3)
    engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
    batches = ShardedBatchIterator(ds, GLOBAL_BATCH, env.dp_rank, env.dp_size, seed=1)
    controller = PlacementController(engine)  # re-bins every smoes.rebin_interval steps
    losses = []
    for step in range(steps):
        losses.append(engine.train_step(next(batches), step).loss)
        controller.after_step(step)
    return engine, losses, batches


def _baseline_worker(rank: int, out: str) -> None:
    from epruntime import distributed

    # One process group for both runs (re-initialising gloo on the same port races).
    env = distributed.init_distributed(config(2))
    results = {}
    for name, extra in [("baseline", []),
                        ("hard0", ["smoes.enabled=true", "smoes.score=hard",
                                   "smoes.mi_coeff=0", "smoes.bal_coeff=0"])]:
        cfg = config(2, *extra)
        distributed.seed_all(cfg.train.seed)
        engine, losses, _ = _train(cfg, env, steps=4)
        results[name] = {"losses": losses, "params": dict(engine.global_state()),
                         "router": type(engine.model.gpt.decoder.layers[0].mlp.router).__name__}
    torch.save(results, f"{out}/rank{rank}.pt")


def test_hard_scores_without_losses_train_bit_identically_to_the_baseline(tmp_path):
    spawn(_baseline_worker, 2, str(tmp_path))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["baseline"]["router"] == "TopKRouter" and r["hard0"]["router"] == "SMoESRouter"
        assert r["hard0"]["losses"] == r["baseline"]["losses"]
        for name, p in r["baseline"]["params"].items():
            assert torch.equal(r["hard0"]["params"][name], p), name


def _state_worker(rank: int, score: str, out: str) -> None:
    from epruntime import checkpoint, distributed
    from epruntime.engine import Engine
    from epruntime.smoes.router import smoes_routers

    cfg = config(2, "smoes.enabled=true", f"smoes.score={score}", "smoes.mi_coeff=0.1",
                 f"train.output_dir={out}/run")
    env = distributed.init_distributed(cfg)
    engine, losses, batches = _train(cfg, env, steps=5)
    routers = smoes_routers(engine.model)
    state = {n: b.clone() for n, b in engine.model.global_named_buffers(env.ep_rank)}
    checkpoint.save_checkpoint(engine, 5, batches.state_dict())
    fresh = Engine(cfg, env, len(batches.dataset.vocab), batches.dataset.num_answers,
                   batches.dataset.max_question_len)
    checkpoint.load_checkpoint(fresh, checkpoint.latest_checkpoint(cfg.train.output_dir))
    restored = dict(fresh.model.global_named_buffers(env.ep_rank))
    grads = [r.weight.grad.clone() for r in routers]
    torch.save({"state": state, "restored": restored, "losses": losses, "router_grads": grads,
                "bins": [r.bin_of_expert.clone() for r in routers]}, f"{out}/rank{rank}.pt")


def _state(tmp_path, score):
    spawn(_state_worker, 2, score, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_gaussian_state_and_bins_agree_across_ranks_and_survive_checkpoints(tmp_path):
    ranks = _state(tmp_path, "gaussian")
    keys = [k for k in ranks[0]["state"] if "router" in k]
    assert any(k.endswith("gaussian.mu") for k in keys) and any(k.endswith("counts.C") for k in keys)
    assert any(k.endswith("bin_of_expert") for k in keys)
    for k in keys:  # router state is replicated: every rank holds the same values
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
    for r in ranks:
        for k, v in r["state"].items():
            assert torch.equal(r["restored"][k], v), k
        for bins in r["bins"]:  # after re-binning: 2 bins of 4 experts, sorted by preference
            assert sorted(bins.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    mu = ranks[0]["state"][next(k for k in keys if k.endswith("gaussian.mu"))]
    assert mu.abs().sum() > 0  # statistics were actually gathered


def test_attention_scores_train_and_agree_across_ranks(tmp_path):
    ranks = _state(tmp_path, "attention")
    for r in ranks:
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert all(g.abs().sum() > 0 for g in r["router_grads"])
    c = next(v for k, v in ranks[0]["state"].items() if k.endswith("counts.C"))
    assert c.sum() > 0 and torch.equal(c, next(v for k, v in ranks[1]["state"].items()
                                                if k.endswith("counts.C")))


def _aux_only_worker(rank: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine
    from epruntime.smoes.router import smoes_routers

    def cfg_for(coeff: str):
        return config(1, "smoes.enabled=true", "smoes.score=attention", f"smoes.mi_coeff={coeff}",
                      "smoes.num_bins=2",  # one bin (EP=1) carries no information: L_MI = 0
                      "smoes.bal_coeff=0", "model.moe_aux_loss_coeff=0")

    env = distributed.init_distributed(cfg_for("0"))
    grads = {}
    for coeff in ("0", "1.0"):
        cfg = cfg_for(coeff)
        distributed.seed_all(cfg.train.seed)
        ds = SyntheticVQA(8, image_size=16, question_len=6, seed=3)
        engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
        batch = ds.batch(torch.arange(8))
        logits = engine.model(batch.images, batch.question_ids, batch.question_lens)
        (0.0 * logits.sum()).backward()  # no task gradient: only aux losses reach the router
        engine.gradients.reduce()  # megatron-core's DDP: param.grad views the reduced buffer
        grads[coeff] = [r.weight.grad.clone() for r in smoes_routers(engine.model)]
    torch.save(grads, f"{out}/rank{rank}.pt")


def test_mi_loss_gradient_reaches_the_router_weights(tmp_path):
    spawn(_aux_only_worker, 1, str(tmp_path))
    grads = torch.load(tmp_path / "rank0.pt")
    assert all(g.abs().sum() == 0 for g in grads["0"])
    assert all(g.abs().sum() > 0 for g in grads["1.0"])


def _bal_form_worker(rank: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine
    from epruntime.smoes.router import smoes_routers

    def cfg_for(form: str):
        return config(1, "smoes.enabled=true", "smoes.score=hard", "smoes.mi_coeff=0",
                      "smoes.num_bins=2", "smoes.bal_coeff=1.0", "model.moe_aux_loss_coeff=0",
                      f"smoes.bal_form={form}")

    env = distributed.init_distributed(cfg_for("bin"))
    ds = SyntheticVQA(8, image_size=16, question_len=6, seed=3)
    batch = ds.batch(torch.arange(8))
    grads = {}
    for form in ("bin", "expert"):
        for name, bins in [("contiguous", [0, 0, 0, 0, 1, 1, 1, 1]),
                           ("interleaved", [0, 1, 0, 1, 0, 1, 0, 1])]:
            engine = Engine(cfg_for(form), env, len(ds.vocab), ds.num_answers,
                            ds.max_question_len)
            for router in smoes_routers(engine.model):
                router.bin_of_expert.copy_(torch.tensor(bins))
            logits = engine.model(batch.images, batch.question_ids, batch.question_lens)
            (0.0 * logits.sum()).backward()  # only the balance loss reaches the router
            engine.gradients.reduce()  # megatron-core's DDP: param.grad views the reduced buffer
            grads[form, name] = [r.weight.grad.clone() for r in smoes_routers(engine.model)]
    torch.save(grads, f"{out}/rank{rank}.pt")


def test_bal_form_bin_depends_on_the_bins_and_expert_form_does_not(tmp_path):
    spawn(_bal_form_worker, 1, str(tmp_path))
    grads = torch.load(tmp_path / "rank0.pt")
    for form in ("bin", "expert"):
        assert all(g.abs().sum() > 0 for g in grads[form, "contiguous"])
    for a, b in zip(grads["expert", "contiguous"], grads["expert", "interleaved"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(grads["bin", "contiguous"], grads["bin", "interleaved"]):
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-6)
