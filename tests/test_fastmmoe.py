"""FastMMoE-style visual-token reduction (epruntime.fastmmoe): the pure pieces (reduced top-k,
similarities, greedy redundancy pruning, attention policies, FLOPs), then the model on real
gloo ranks with megatron-core: identity at k'=k and retention 1, pruned logits equal to a run
made directly on the kept tokens, different token counts per rank, the ledger and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from epruntime.config import ConfigError, FastMMoEConfig, load_config
from epruntime.fastmmoe.activation import reduce_topk
from epruntime.fastmmoe.flops import FlopCounter
from epruntime.fastmmoe.policies import (FastVPolicy, Observation, Text2VisionPolicy,
                                         build_policy, greedy_keep)
from epruntime.fastmmoe.similarity import cosine_similarity, js_similarity
from tests import configs
from tests.dist import spawn


# ---- reduced activation -----------------------------------------------------------------------
def test_reduce_topk_keeps_the_heaviest_experts_of_visual_tokens_only():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.0, 0.5]])
    routing = probs > 0
    reduce = torch.tensor([True, False, True])
    p, m = reduce_topk(probs, routing, reduce, 2)
    assert m[2, 3] and m[2].sum() == 2  # the 0.5 expert stays, with one of the tied 0.25s
    assert m[0].tolist() == [True, True, False, False]
    assert torch.equal(p[1], probs[1]) and torch.equal(m[1], routing[1])  # text row untouched
    torch.testing.assert_close(p[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(p.sum(1), probs.sum(1))  # weights keep the row's total
    assert (p[~m] == 0).all() and m.sum(1).tolist() == [2, 3, 2]


def test_reduce_topk_is_the_identity_when_k_prime_covers_k():
    probs = torch.rand(7, 6)
    routing = torch.zeros(7, 6, dtype=torch.bool).scatter_(1, probs.topk(3, 1).indices, True)
    probs = probs * routing
    p, m = reduce_topk(probs, routing, torch.ones(7, dtype=torch.bool), 3)
    assert p is probs and m is routing
    with pytest.raises(ValueError, match="k_reduced"):
        reduce_topk(probs, routing, torch.ones(7, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="reduce_T"):
        reduce_topk(probs, routing, torch.ones(6, dtype=torch.bool), 1)


# ---- similarity and policies ------------------------------------------------------------------
def test_similarities_are_one_for_identical_and_symmetric():
    p = torch.softmax(torch.randn(2, 5, 8), -1)
    p[:, 3] = p[:, 1]
    for fn in (cosine_similarity, js_similarity):
        s = fn(p)
        torch.testing.assert_close(s, s.transpose(1, 2))
        torch.testing.assert_close(s[:, 1, 3], torch.ones(2))
        assert (s <= 1 + 1e-6).all()
    disjoint = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert js_similarity(disjoint)[0, 0, 1].abs() < 1e-6  # JS = ln 2 -> similarity 0


def _greedy_brute_force(sim: torch.Tensor, keep: int) -> list[int]:
    p = sim.shape[0]
    alive = list(range(p))
    while len(alive) > max(keep, 1):
        red = [max(sim[i, j].item() for j in alive if j != i) for i in alive]
        alive.pop(max(range(len(alive)), key=lambda a: (red[a], -a)))
    return alive[:keep]


def test_greedy_keep_matches_the_brute_force_greedy():
    gen = torch.Generator().manual_seed(0)
    for p, keep in [(6, 3), (9, 1), (12, 8), (5, 5), (5, 0)]:
        g = torch.softmax(torch.randn(3, p, 4, generator=gen) * 2, -1)
        sim = cosine_similarity(g)
        got = greedy_keep(sim, keep)
        assert got.shape == (3, keep)
        for b in range(3):
            assert got[b].tolist() == _greedy_brute_force(sim[b], keep)


def test_fastmmoe_policy_drops_duplicates_first_and_merges_into_the_closest():
    g = torch.softmax(torch.randn(1, 6, 8) * 3, -1)
    g[0, 4] = g[0, 1]  # token 4 duplicates token 1: one of them goes first
    g[0, 5] = g[0, 2]
    policy = build_policy("fastmmoe", "cosine")
    obs = Observation(6, torch.ones(1, 9, dtype=torch.bool), routing_BPE=g)
    sel = policy.select(obs, 4)
    kept = sel.keep_BK[0].tolist()
    assert kept == sorted(kept) and len(kept) == 4
    assert not ({1, 4} <= set(kept)) and not ({2, 5} <= set(kept))
    sel = policy.select(obs, 4, merge=True)
    into = sel.merge_into_BP[0]
    kept = sel.keep_BK[0].tolist()
    assert [into[k].item() for k in kept] == [0, 1, 2, 3]  # kept tokens join themselves
    dropped = [t for t in range(6) if t not in kept]
    for t in dropped:  # a dropped duplicate joins its twin
        twin = {1: 4, 4: 1, 2: 5, 5: 2}.get(t)
        if twin in kept:
            assert kept[into[t]] == twin


def test_attention_policies_rank_by_received_and_text_attention():
    p, s = 4, 7  # 4 visual tokens, 3 text tokens, the last one padding
    att = torch.zeros(1, s, s)
    att[0, :, 2] = 0.5  # every query attends to visual token 2
    att[0, 4:6, 0] = 0.4  # the (valid) text queries attend to token 0
    att[0, 6, 3] = 1.0  # the padding query attends to token 3: must not count
    valid = torch.tensor([[True] * 6 + [False]])
    obs = Observation(p, valid, attention_BSS=att)
    assert FastVPolicy().select(obs, 2).keep_BK.tolist() == [[0, 2]]
    assert Text2VisionPolicy().select(obs, 1).keep_BK.tolist() == [[2]]
    att[0, 4:6, 2] = 0.0
    assert Text2VisionPolicy().select(obs, 1).keep_BK.tolist() == [[0]]


def test_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="fastmmoe.retention"):
        load_config(None, ["fastmmoe.retention=1.5"])
    with pytest.raises(ConfigError, match="fastmmoe.layers"):
        load_config(None, ["fastmmoe.policy=fastv", "fastmmoe.layers=[5]"])
    with pytest.raises(ConfigError, match="fastmmoe.vision_topk"):
        load_config(None, ["fastmmoe.vision_topk=[1,2,3]"])
    with pytest.raises(ConfigError, match="fastmmoe.mode=merge"):
        load_config(None, ["fastmmoe.policy=fastv", "fastmmoe.mode=merge"])
    with pytest.raises(ConfigError, match="fastmmoe.policy"):
        load_config(None, ["fastmmoe.policy=bogus"])
    assert FastMMoEConfig(vision_topk=[1, 9]).vision_topk_at(1, 4) == 4


def test_flop_counter_by_hand():
    d, e, k, f, v = 8, 4, 2, 16, 10
    c = FlopCounter(hidden=d, num_layers=1, num_experts=e, topk=k, ffn=f, vocab=v, patch_dim=12)
    c.on_batch(batch=2, num_vision=3, seq=5)  # 6 visual, 4 text tokens
    c.on_layer(0, torch.tensor([[1, 1], [1, 1], [1, 1], [0, 0], [0, 0]]))
    c.on_experts(0, torch.tensor([8.0, 6.0]))  # text kept k=2, visual tokens k'=1
    c.on_output(2, 5)
    s = c.summary()
    attn = 8 * d * d + 4 * 5 * d
    assert s["per_layer"][0]["attention"] == {"text": 4 * attn, "vision": 6 * attn}
    assert s["per_layer"][0]["experts"] == {"text": 8 * 4 * d * f, "vision": 6 * 4 * d * f}
    full_layer = 10 * (attn + 2 * d * e) + 10 * k * 4 * d * f
    assert s["per_layer"][0]["full"] == full_layer
    other = 2 * 3 * 2 * (12 * d + d * d) + 2 * 5 * 2 * d * v
    assert s["full"] == full_layer + other
    assert s["ratio"] == pytest.approx(s["total"] / s["full"]) and s["ratio"] < 1


# ---- the model on real ranks ------------------------------------------------------------------
P, Q = 16, 6  # visual tokens (16x16 image, 4x4 patches), question length


def small_config(kind: str):
    return configs.small_config("parallel.ep_size=2", f"dispatch.kind={kind}")


def _direct(model, images, qids, qlens, keep_BK, k_vision: int):
    """Layer 0 on every token, then layer 1 on the kept tokens only, by calling megatron-core's
    layers directly (k' applied through the reducer with no pruning policy)."""
    from epruntime.modality import TEXT, VISION

    b, keep = keep_BK.shape
    model.reducer.configure(FastMMoEConfig(enabled=True, vision_topk=k_vision))
    model.reducer.begin(False, qlens, P, P + Q)
    layers = model.gpt.decoder.layers
    with model.tokens.forward(model.modality(b)):
        h0, _ = layers[0](hidden_states=model.embed(images, qids), attention_mask=None)
        index_SB = torch.cat([keep_BK.T, P + torch.arange(Q)[:, None].expand(Q, b)])
        h = h0.gather(0, index_SB[:, :, None].expand(-1, -1, h0.shape[-1]))
        col = torch.cat([torch.full((keep,), VISION), torch.full((Q,), TEXT)])
        model.tokens.enter(col[:, None].expand(keep + Q, b))
        model.reducer.num_vision = keep
        h1, _ = layers[1](hidden_states=h, attention_mask=None)
        logits, _ = model.gpt.output_layer(model.gpt.decoder.final_layernorm(h1))
    model.reducer.end(b, keep + Q)
    last = keep + qlens - 1
    return h, logits.transpose(0, 1)[torch.arange(b), last][:, model.answer_offset:]


KINDS = ("dedup", "alltoall")
POLICIES = ("fastmmoe", "fastv", "text2vision")
IDENTITY_CASES = [(p, m) for p in POLICIES for m in (("drop", "merge") if p == "fastmmoe"
                                                     else ("drop",))]


def _model_worker(rank: int, out: str) -> None:
    """Both dispatchers, every policy, on two ranks holding different batch sizes; records what
    the property tests below assert (one spawn for the module)."""
    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine

    env = distributed.init_distributed(small_config("dedup"))
    ds = SyntheticVQA(64, image_size=16, question_len=Q, seed=3)
    n = 3 if rank == 0 else 5  # ranks prune different numbers of tokens
    batch = ds.batch(torch.arange(rank * 8, rank * 8 + n))
    args = (batch.images, batch.question_ids, batch.question_lens)
    results = {"n": n}
    for kind in KINDS:
        distributed.seed_all(0)
        engine = Engine(small_config(kind), env, len(ds.vocab), ds.num_answers, ds.max_question_len)
        model = engine.model.eval()
        reducer = model.reducer
        r = results[kind] = {"identity": {}, "pruned": {}}
        with torch.no_grad():
            reducer.configure(FastMMoEConfig())
            full = model(*args)
            for policy, mode in IDENTITY_CASES:  # k' = k and retention 1
                reducer.configure(FastMMoEConfig(enabled=True, policy=policy, mode=mode,
                                                 retention=1.0, vision_topk=3))
                r["identity"][policy, mode] = torch.equal(model(*args), full)

            for policy in POLICIES:
                cfg = FastMMoEConfig(enabled=True, policy=policy, retention=0.5, vision_topk=2,
                                     similarity="js" if kind == "alltoall" else "cosine")
                reducer.configure(cfg)
                seen = {}
                hook = model.gpt.decoder.layers[1].register_forward_pre_hook(
                    lambda m, a, kw: seen.__setitem__("h", kw["hidden_states"]), with_kwargs=True)
                pruned = model(*args)
                hook.remove()
                keep_BK = reducer.last_kept[0]
                num_vision = reducer.num_vision
                kept_h, direct = _direct(model, *args, keep_BK, 2)
                r["pruned"][policy] = {
                    "keep_shape": tuple(keep_BK.shape), "num_vision": num_vision,
                    "ascending": bool((keep_BK.diff(dim=1) > 0).all()),
                    "layer1_rows": seen["h"].shape[0], "layer1_input": seen["h"],
                    "direct_input": kept_h, "logits": pruned, "direct_logits": direct,
                    "changed": not torch.equal(pruned, full)}

            reducer.configure(FastMMoEConfig(enabled=True, policy="fastmmoe", mode="merge",
                                             retention=0.25))
            merged = model(*args)
            r["merge"] = {"same_shape": merged.shape == full.shape,
                          "finite": bool(torch.isfinite(merged).all()),
                          "num_vision": reducer.num_vision}

            # Reduced activation: fewer (token, expert) pairs reach the dispatcher and the FLOPs.
            engine.ledger.reset()
            reducer.reset_stats()
            reducer.configure(FastMMoEConfig(enabled=True, vision_topk=1))
            model(*args)
            r["pairs"] = sum(engine.comm_summary()["load_per_rank"])  # both layers and ranks
            r["flops"] = reducer.flops.summary()
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def reduction(tmp_path_factory):
    """[rank] -> the worker's results, from one spawn of two ranks."""
    out = tmp_path_factory.mktemp("fastmmoe")
    spawn(_model_worker, 2, str(out))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy, mode", IDENTITY_CASES)
def test_full_retention_with_k_unchanged_is_bit_identical(reduction, kind, policy, mode):
    for rank in range(2):
        assert reduction[rank][kind]["identity"][policy, mode], rank


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_pruning_keeps_half_the_visual_tokens_of_every_sample(reduction, kind, policy):
    for rank in range(2):
        r, n = reduction[rank][kind]["pruned"][policy], reduction[rank]["n"]
        assert r["keep_shape"] == (n, P // 2) and r["num_vision"] == P // 2
        assert r["ascending"]  # kept tokens stay in their order
        assert r["layer1_rows"] == P // 2 + Q  # every text token is still there
        assert r["changed"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_pruned_layer_input_equals_the_kept_rows_of_a_direct_run(reduction, kind, policy):
    for rank in range(2):
        r = reduction[rank][kind]["pruned"][policy]
        assert torch.equal(r["layer1_input"], r["direct_input"]), rank


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_pruned_logits_equal_layers_called_on_the_kept_tokens(reduction, kind, policy):
    for rank in range(2):
        r = reduction[rank][kind]["pruned"][policy]
        torch.testing.assert_close(r["logits"], r["direct_logits"], rtol=1e-5, atol=1e-6,
                                   msg=f"rank {rank}")


@pytest.mark.parametrize("kind", KINDS)
def test_merge_mode_keeps_a_quarter(reduction, kind):
    for rank in range(2):
        r = reduction[rank][kind]["merge"]
        assert r["same_shape"] and r["finite"] and r["num_vision"] == P // 4


@pytest.mark.parametrize("kind", KINDS)
def test_reduced_activation_dispatches_fewer_pairs_and_counts_their_flops(reduction, kind):
    total_tokens = 8  # 3 + 5 samples
    d, f = 32, 16
    for rank in range(2):
        r = reduction[rank][kind]
        assert r["pairs"] == 2 * total_tokens * (Q * 3 + P * 1)
        for layer in r["flops"]["per_layer"]:
            assert layer["experts"]["vision"] == total_tokens * P * 1 * 4 * d * f
            assert layer["experts"]["text"] == total_tokens * Q * 3 * 4 * d * f
        assert r["flops"]["ratio"] < 1


# ---- the benchmark and the inference entry point ------------------------------------------------
def test_bench_fastmmoe_quick_then_infer_with_a_policy(python_env, tmp_path):
    """bench.py fastmmoe --quick trains a checkpoint with torchrun, evaluates every variant on
    two ranks and plots; then `epruntime.infer` serves that checkpoint with FastMMoE on."""
    import json
    import subprocess

    from epruntime.config import load_config
    from tests.conftest import ROOT, python_bin

    # the tiny config's vision tokens (16 with its conv stem); kept counts are round(r * P)
    P = load_config(ROOT / "launch" / "configs" / "tiny-vqa.yaml").model.num_vision_tokens
    out, work = tmp_path / "fastmmoe.json", tmp_path / "work"
    proc = subprocess.run([python_bin(), str(ROOT / "profiling" / "bench.py"), "fastmmoe",
                           "--quick", "--json", str(out), "--workdir", str(work)],
                          cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["full", "reduced", "fastmmoe@0.5", "fastmmoe@0.25", "fastmmoe@0.125",
                          "fastv@0.5", "fastv@0.25", "text2vision@0.25"]
    assert rows["full"]["flops_ratio"] == 1.0 and rows["full"]["accuracy_retention"] == 1.0
    assert rows["full"]["vision_tokens_kept"] == P
    for name, row in rows.items():
        assert len(row["samples"]) == result["params"]["repeats"]
        assert row["prefill_tokens_per_s"] > 0 and 0 <= row["eval_accuracy"] <= 1, name
        assert row["cross_rank_bytes"] > 0
        if name != "full":
            assert row["flops_ratio"] < 1 and row["cross_rank_bytes"] < rows["full"][
                "cross_rank_bytes"], name
    assert rows["fastmmoe@0.25"]["vision_tokens_kept"] == round(0.25 * P)
    assert rows["fastv@0.5"]["vision_tokens_kept"] == round(0.5 * P)
    # Same retention, same k: the attention policies do the same work.
    assert rows["fastv@0.25"]["flops_ratio"] == rows["text2vision@0.25"]["flops_ratio"]
    # FastMMoE adds k'=1 on top of pruning: less work than FastV at equal retention.
    assert rows["fastmmoe@0.25"]["flops_ratio"] < rows["fastv@0.25"]["flops_ratio"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    infer_dir = tmp_path / "infer"
    cmd = [python_bin(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "epruntime.infer", "--checkpoint", str(work / "train")]
    for o in ("fastmmoe.enabled=true", "fastmmoe.policy=text2vision", "fastmmoe.retention=0.25",
              "data.max_eval_items=32", f"infer.output_dir={infer_dir}"):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=python_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((infer_dir / "summary.json").read_text())
    assert summary["vision_tokens_kept"] == round(0.25 * P) and summary["vision_tokens"] == P
    assert 0 < summary["flops_ratio"] < 1 and summary["prefill_tokens_per_s"] > 0
    assert summary["flops"]["total"] == pytest.approx(summary["flops_ratio"] *
                                                      summary["flops"]["full"])
    assert math.isfinite(summary["eval_accuracy"])
