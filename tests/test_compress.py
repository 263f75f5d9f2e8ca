"""Learned visual-token compression (epruntime.compress): LearnPruner's stage 1 and QMoP.

The pure pieces by hand (straight-through gate, merging, farthest seeds, the modules' shapes
and gradients), the config's named errors, then the model on real gloo ranks at EP=2 with
megatron-core: budget 1.0 reproduces the full model bit for bit; both methods train, their
parameters stay dense (replicated, reduced) and checkpoint/resume is bit-identical; a full
checkpoint fine-tunes into a variant that the benchmark helpers evaluate."""

from __future__ import annotations

import pytest
import torch

from epruntime.compress.learnpruner import LearnPrunerStage1
from epruntime.compress.qmop import QMoP, branch_weights, masked_mean, pool_tokens
from epruntime.compress.select import (farthest_seeds, gather_rows, segment_softmax_merge,
                                       straight_through_gate, top_k_ascending)
from epruntime.config import ConfigError, load_config
from epruntime.fastmmoe.flops import FlopCounter
from epruntime.model.sharding import is_expert_param
from tests import configs
from tests.dist import spawn

P = 16  # the small config's visual tokens (16x16 image, 4x4 patches)


# ---- pure pieces ------------------------------------------------------------------------------
def test_top_k_ascending_and_straight_through_gate():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    assert top_k_ascending(score, 2).tolist() == [[1, 3], [0, 1]]
    prob = torch.tensor([[0.2, 0.7]], requires_grad=True)
    gate = straight_through_gate(prob)
    assert torch.equal(gate, torch.ones(1, 2))  # forward value is exactly 1
    (gate * torch.tensor([[2.0, -3.0]])).sum().backward()
    assert prob.grad.tolist() == [[2.0, -3.0]]  # gradient passes straight through


def test_segment_softmax_merge_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]]])
    logit = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    group = torch.tensor([[0, 0, 1]])
    out = segment_softmax_merge(x, logit, group, 2)
    torch.testing.assert_close(out, torch.tensor([[[0.5, 0.5], [4.0, 4.0]]]))
    out[0, 0, 0].backward()  # group 0: w0 = w1 = 1/2; d/dl0 of w0*1 = w0(1-w0) = 1/4
    torch.testing.assert_close(logit.grad, torch.tensor([[0.25, -0.25, 0.0]]))


def test_farthest_seeds_pick_what_the_chosen_rows_do_not_cover():
    e = torch.eye(3)
    feat = torch.stack([e[0], e[0], e[1], e[2]])[None]  # rows 0, 1 like the chosen one
    chosen = e[0][None, None]
    seeds = farthest_seeds(feat, chosen, 2)
    assert sorted(seeds[0].tolist()) == [2, 3]
    assert farthest_seeds(feat, chosen, 0).shape == (1, 0)


def test_learnpruner_stage1_keeps_the_budget_in_position_order():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 8)  # [P, B, D]
    for diversity in (0.0, 0.5):
        lp = LearnPrunerStage1(8, 12, keep=4, diversity=diversity, scorer_hidden=6)
        lp.eval()
        out = lp(x)
        pos = out.position_BK
        assert out.vision_KBD.shape == (4, 3, 8) and pos.shape == (3, 4)
        assert (pos.diff(dim=1) > 0).all()
        logit = lp.scores(x.transpose(0, 1))
        top = top_k_ascending(logit, 4 - lp.num_diverse)
        for b in range(3):  # the top-scored tokens are there as they were
            for t in top[b].tolist():
                row = pos[b].tolist().index(t)
                assert torch.equal(out.vision_KBD[row, b], x[t, b])
        assert lp.num_diverse == (2 if diversity else 0)
    full = LearnPrunerStage1(8, 12, keep=12, diversity=0.5, scorer_hidden=6).train()
    assert torch.equal(full(x).vision_KBD, x)  # nothing to drop: the identity, even training
    with pytest.raises(ValueError, match="keeps 13 of 12"):
        LearnPrunerStage1(8, 12, keep=13, diversity=0.0, scorer_hidden=6)


def test_learnpruner_scores_learn_from_kept_and_dropped_tokens():
    """Straight-through on the kept tokens, the merge softmax on the dropped ones: the loss
    reaches the scorer through both, and the scores of tokens outside the budget move too."""
    torch.manual_seed(1)
    lp = LearnPrunerStage1(8, 10, keep=4, diversity=0.5, scorer_hidden=6).train()
    x = torch.randn(10, 2, 8, requires_grad=True)
    logits = {}
    lp.fc2.register_forward_hook(lambda m, a, out: logits.__setitem__("l", out))
    out = lp(x).vision_KBD
    logits["l"].retain_grad()
    out.pow(2).sum().backward()
    g = logits["l"].grad.squeeze(-1)  # [B, P]
    for b in range(2):
        kept = set(top_k_ascending(lp.scores(x.detach().transpose(0, 1)), 2)[b].tolist())
        assert all(g[b, t] != 0 for t in kept)
        assert any(g[b, t] != 0 for t in set(range(10)) - kept)
    assert lp.fc1.weight.grad.abs().sum() > 0


def test_qmop_branches_router_and_gradients():
    torch.manual_seed(2)
    q = QMoP(8, 12, keep=3, heads=2, router_topk=3).train()
    x, t = torch.randn(12, 2, 8), torch.randn(5, 2, 8)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = q(x, t, valid).vision_KBD
    assert out.shape == (3, 2, 8) and torch.isfinite(out).all()
    out.sum().backward()
    for name in ("queries", "router.weight", "prune_score.weight", "resampler.in_proj_weight"):
        assert q.get_parameter(name).grad.abs().sum() > 0, name
    # each branch alone: pooling averages runs of 4 tokens, pruning keeps tokens as they are
    torch.testing.assert_close(pool_tokens(x.transpose(0, 1), 3)[:, 0], x[:4].mean(0))
    w = branch_weights(torch.tensor([[1.0, 2.0, 0.0]]), 1)
    assert w.tolist() == [[0.0, 1.0, 0.0]]
    torch.testing.assert_close(branch_weights(torch.zeros(1, 3), 3), torch.full((1, 3), 1 / 3))
    torch.testing.assert_close(masked_mean(t.transpose(0, 1), valid)[1], t[:2, 1].mean(0))
    # the question steers the router: another question, other branch weights
    w1 = q.route(x.transpose(0, 1), t.transpose(0, 1), valid)
    w2 = q.route(x.transpose(0, 1), -t.transpose(0, 1), valid)
    assert not torch.equal(w1, w2) and torch.allclose(w1.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="qmop outputs 12 of 12"):
        QMoP(8, 12, keep=12, heads=2, router_topk=3)


def test_config_names_the_bad_field():
    small = configs.SMALL
    cases = [("learnpruner.budget", ["learnpruner.budget=0"]),
             ("learnpruner.budget", ["learnpruner.budget=1.5"]),
             ("qmop.budget", ["qmop.budget=-0.1"]),
             ("learnpruner.tokens=17 exceeds the 16 visual tokens",
              ["learnpruner.enabled=true", "learnpruner.tokens=17"]),
             ("qmop.tokens=40 exceeds the 16 visual tokens",
              ["qmop.enabled=true", "qmop.tokens=40"]),
             ("learnpruner.tokens", ["learnpruner.tokens=0"]),
             ("learnpruner.diversity", ["learnpruner.diversity=1"]),
             ("choose one", ["learnpruner.enabled=true", "qmop.enabled=true"]),
             ("learnpruner.stage2_layer=2", ["learnpruner.enabled=true",
                                             "learnpruner.stage2_layer=2"]),
             ("leave fastmmoe.enabled=false", ["learnpruner.enabled=true",
                                               "fastmmoe.enabled=true"]),
             ("qmop.resampler_heads=3", ["qmop.enabled=true", "qmop.resampler_heads=3"]),
             ("qmop.router_topk", ["qmop.router_topk=4"]),
             ("learnpruner.budgett: unknown key", ["learnpruner.budgett=0.5"])]
    for match, overrides in cases:
        with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
            load_config(None, [*small, *overrides])
    cfg = load_config(None, [*small, "learnpruner.enabled=true", "learnpruner.budget=0.055"])
    assert cfg.learnpruner.keep(P) == 1  # 5.5% of 16 rounds to 1 token (never 0)
    assert load_config(None, [*small, "qmop.tokens=16"]).qmop.keep(P) == 16


def test_flop_counter_adds_the_compressor_to_the_run_not_to_the_full_model():
    c = FlopCounter(hidden=8, num_layers=1, num_experts=4, topk=2, ffn=16, vocab=10, patch_dim=12)
    c.on_batch(batch=2, num_vision=3, seq=5)
    c.on_module(1000.0)
    s = c.summary()
    assert s["token_compressor"] == 1000.0
    c2 = FlopCounter(hidden=8, num_layers=1, num_experts=4, topk=2, ffn=16, vocab=10, patch_dim=12)
    c2.on_batch(batch=2, num_vision=3, seq=5)
    assert s["full"] == c2.summary()["full"] and s["total"] == c2.summary()["total"] + 1000.0


# ---- the model on real ranks ------------------------------------------------------------------
BASE = ["parallel.ep_size=2", "dispatch.kind=dedup", "train.warmup_steps=1",
        "data.synthetic_items=128", "data.max_eval_items=32", "data.eval_batch_size=8"]
LEARNPRUNER = ["learnpruner.enabled=true", "learnpruner.budget=0.25", "learnpruner.diversity=0.5",
               "learnpruner.stage2_retention=0.5"]
QMOP = ["qmop.enabled=true", "qmop.budget=0.25", "qmop.resampler_heads=2"]
IDENTITY = {"learnpruner": ["learnpruner.enabled=true", "learnpruner.budget=1.0",
                            "learnpruner.diversity=0.5", "learnpruner.stage2_retention=1.0"],
            "learnpruner-stage1": ["learnpruner.enabled=true", "learnpruner.budget=1.0",
                                   "learnpruner.stage2=false"],
            "qmop": ["qmop.enabled=true", "qmop.budget=1.0"]}


def _cfg(*overrides: str):
    return configs.small_config(*BASE, *overrides)


def _build(cfg, env):
    from epruntime import distributed
    from epruntime.data import ShardedBatchIterator
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine

    distributed.seed_all(cfg.train.seed)
    train_ds, eval_ds = build_datasets(cfg)
    engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers, train_ds.max_question_len)
    batches = ShardedBatchIterator(train_ds, cfg.data.global_batch_size, env.dp_rank, env.dp_size,
                                   seed=cfg.train.seed)
    return engine, batches, eval_ds


def _shared_grads(engine) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in engine.model.global_named_parameters(engine.env.ep_rank)
            if not n.startswith("compressor.") and p.grad is not None}


def _identity_worker(rank: int, out: str) -> None:
    """Budget 1.0 against the full model, same seed: eval logits, training loss and the
    gradients of every shared parameter; and a 0.25 budget's FLOPs and kept tokens."""
    from epruntime import distributed

    env = distributed.init_distributed(_cfg())
    results = {}
    for name, overrides in {"full": [], **IDENTITY}.items():
        engine, batches, eval_ds = _build(_cfg(*overrides), env)
        batch = eval_ds.batch(torch.arange(rank * 4, rank * 4 + 4))
        engine.model.eval()
        with torch.no_grad():
            logits = engine.model(batch.images, batch.question_ids, batch.question_lens)
        engine.model.train()
        loss = engine.forward_backward(next(batches), 8)
        results[name] = {"logits": logits, "loss": loss, "grads": _shared_grads(engine),
                         "has_compressor": engine.model.compressor is not None}
    for name, overrides in {"learnpruner": LEARNPRUNER, "qmop": QMOP}.items():
        engine, _, eval_ds = _build(_cfg(*overrides), env)
        m = engine.evaluate(eval_ds)
        results[name + "@0.25"] = {"kept": m["vision_tokens_kept"], "ratio": m["flops_ratio"],
                                   "module": m["flops"]["token_compressor"],
                                   "expected_module": engine.model.compressor.flops(1)}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity")
    spawn(_identity_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(IDENTITY))
def test_budget_one_reproduces_the_full_model_bit_for_bit(identity, name):
    for rank in range(2):
        full, got = identity[rank]["full"], identity[rank][name]
        assert torch.equal(got["logits"], full["logits"]), rank
        assert got["loss"] == full["loss"]
        assert got["grads"].keys() == full["grads"].keys()
        for n, g in full["grads"].items():
            assert torch.equal(got["grads"][n], g), n
    # LearnPruner's module runs (scores all P, keeps all P); QMoP at P is the projector alone
    assert identity[0][name]["has_compressor"] == name.startswith("learnpruner")


def test_a_quarter_budget_keeps_its_tokens_and_counts_the_module(identity):
    r = identity[0]
    # stage 1 keeps 4 of 16, stage 2 (text2vision after layer 0) half of them
    assert r["learnpruner@0.25"]["kept"] == 2 and r["qmop@0.25"]["kept"] == 4
    eval_items = 32  # 4 passes of 4 samples per rank, no padding
    for name in ("learnpruner@0.25", "qmop@0.25"):
        assert 0 < r[name]["ratio"] < 1, name
        assert r[name]["module"] == eval_items * r[name]["expected_module"], name
    # 2 visual tokens after stage 2 against QMoP's 4: less work
    assert r["learnpruner@0.25"]["ratio"] < r["qmop@0.25"]["ratio"]


TRAIN_STEPS = 3  # a checkpoint after 2


def _probe(engine, batches, eval_ds, step):
    acc = engine.evaluate(eval_ds)["eval_accuracy"]
    return {"acc": acc, "losses": [engine.train_step(next(batches), s).loss
                                   for s in (step, step + 1)]}


def _train_worker(rank: int, out: str) -> None:
    """Each method trains at EP=2 from scratch with a checkpoint after 2 steps; a fresh engine
    resumes from it. Then a full checkpoint is fine-tuned into a LearnPruner variant."""
    import torch.distributed as dist

    from epruntime import checkpoint, distributed
    from epruntime.compress import finetune as ft

    env = distributed.init_distributed(_cfg())
    results = {}
    for name, overrides in {"learnpruner": LEARNPRUNER, "qmop": QMOP, "full": []}.items():
        cfg = _cfg(*overrides, f"train.output_dir={out}/{name}")
        engine, batches, eval_ds = _build(cfg, env)
        init = {n: p.detach().clone() for n, p in engine.model.named_parameters()
                if n.startswith("compressor.")}
        for step in range(TRAIN_STEPS):
            engine.train_step(next(batches), step)
            if step + 1 == 2:
                path = checkpoint.save_checkpoint(engine, 2, batches.state_dict())
                grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()
                         if n.startswith("compressor.")}
        names = ft.compressor_param_names(engine.model)
        params = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n in names}
        gathered = [None, None]
        dist.all_gather_object(gathered, params)
        ref = _probe(engine, batches, eval_ds, TRAIN_STEPS)
        fresh, fresh_batches, _ = _build(cfg, env)
        meta = checkpoint.load_checkpoint(fresh, path)
        fresh_batches.load_state_dict(meta["data"])
        for _ in range(TRAIN_STEPS - 2):  # to where `ref` was probed
            fresh.train_step(next(fresh_batches), meta["step"])
        results[name] = {
            "names": names, "dense": not any(is_expert_param(n) for n in names),
            "replicated": all(torch.equal(gathered[0][n], gathered[1][n]) for n in names),
            "moved": all(not torch.equal(params[n], init[n]) for n in names),
            "grads_nonzero": {n: bool(g.abs().sum() > 0) for n, g in grads.items()},
            "ref": ref, "resumed": _probe(fresh, fresh_batches, eval_ds, TRAIN_STEPS),
            "saved_keys": sorted(k for k in checkpoint.read_meta(path)["integrity"]["tensors"]
                                 if "compressor." in k),
            "path": str(path)}

    # the benchmark's path: a full checkpoint -> LearnPruner variant, fine-tuned 2 steps
    cfg = _cfg(*LEARNPRUNER, f"train.output_dir={out}/ft")
    engine, batches, eval_ds = _build(cfg, env)
    left = ft.load_base_weights(engine, results["full"]["path"])
    full_engine, _, _ = _build(_cfg(f"train.output_dir={out}/full"), env)
    checkpoint.load_checkpoint(full_engine, results["full"]["path"], restore_training_state=False)
    full_state = dict(full_engine.model.global_named_parameters(env.ep_rank))
    same = all(torch.equal(p, full_state[n]) for n, p in
               engine.model.global_named_parameters(env.ep_rank) if n in full_state)
    full_row = ft.evaluate_variant(full_engine, eval_ds)
    losses = ft.finetune(engine, batches, 2)
    row = ft.evaluate_variant(engine, eval_ds, full_row)
    results["finetune"] = {"left": left, "same": same, "losses": losses, "row": row,
                           "full_row": full_row}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    spawn(_train_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["learnpruner", "qmop"])
def test_trains_under_ep2_with_dense_replicated_parameters(trained, name):
    for rank in range(2):
        r = trained[rank][name]
        assert r["names"] and r["dense"] and r["replicated"] and r["moved"], rank
        assert all(r["grads_nonzero"].values()), r["grads_nonzero"]


@pytest.mark.parametrize("name", ["learnpruner", "qmop"])
def test_checkpoint_resume_is_bit_identical(trained, name):
    for rank in range(2):
        r = trained[rank][name]
        assert r["resumed"] == r["ref"], rank
        assert len(r["saved_keys"]) >= len(r["names"])  # parameters (and AdamW state) saved


def test_a_full_checkpoint_finetunes_into_a_variant(trained):
    r = trained[0]["finetune"]
    assert r["left"] and all(n.startswith("compressor.") for n in r["left"])
    assert r["same"]  # every shared tensor came from the checkpoint
    assert len(r["losses"]) == 2 and all(loss > 0 for loss in r["losses"])
    row, full = r["row"], r["full_row"]
    assert full["accuracy_retention"] == 1.0 and full["flops_ratio"] == 1.0
    assert full["vision_tokens_kept"] == P and row["vision_tokens_kept"] == 2
    assert row["flops_ratio"] < 0.5 and row["token_compressor_flops"] > 0
    assert row["accuracy_retention"] == pytest.approx(row["eval_accuracy"] / full["eval_accuracy"])
