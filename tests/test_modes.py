"""MoDES dual-modality expert skipping (epruntime.modes): the pure pieces (scores and skipped
pairs, the frontier searches against brute force, the calibration file and config errors), then
the model on real gloo ranks with megatron-core and both dispatchers: thresholds 0 reproduce the
full model bit for bit, the ledger dispatches exactly text*k + vision*k minus the skipped pairs,
the FLOPs count what ran, and calibration is deterministic for a seed."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch

from epruntime.config import ConfigError, ModesConfig, load_config
from epruntime.modes.calibrate import calibration_rows
from epruntime.modes.calibration import (CalibratedModel, Calibration, CalibrationError,
                                         check_fingerprint, load_calibration)
from epruntime.modes.search import max_skip_within_kl, min_kl_at_skip, threshold_grid
from epruntime.modes.skip import drop_pairs, skip_pairs
from tests import configs
from tests.dist import spawn

P, Q, K = 16, 6, 3  # visual tokens (16x16 image, 4x4 patches), question length, top-k


# ---- pure pieces --------------------------------------------------------------------------------
def test_skip_pairs_scores_alpha_times_weight_against_the_tokens_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0],    # text
                          [0.5, 0.3, 0.2, 0.0],    # vision
                          [0.0, 0.6, 0.0, 0.4]])   # vision
    routing_map = probs > 0
    modality = torch.tensor([0, 1, 1])
    alpha = torch.tensor([0.5, 1.0])  # text pairs score half their weight
    threshold = torch.tensor([0.2, 0.35])
    skip = skip_pairs(probs, routing_map, modality, alpha, threshold)
    # text: scores .25 .15 .10 -> skip the .3 and .2 experts; vision: skip < .35
    assert skip.tolist() == [[False, True, True, False], [False, True, True, False],
                             [False, False, False, False]]
    new_probs, new_map = drop_pairs(probs, routing_map, skip)
    assert new_map.tolist() == (routing_map & ~skip).tolist()
    # the weights that stay are not renormalised (MoDES)
    assert torch.equal(new_probs, torch.tensor([[0.5, 0, 0, 0], [0.5, 0, 0, 0],
                                                [0.0, 0.6, 0.0, 0.4]]))


def test_zero_thresholds_skip_nothing_and_leave_the_routing_bit_identical():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 8, generator=g)
    routing_map = probs > 0.6
    probs = probs * routing_map
    skip = skip_pairs(probs, routing_map, torch.randint(0, 2, (50,), generator=g),
                      torch.rand(2, generator=g), torch.zeros(2))
    assert not skip.any()
    new_probs, new_map = drop_pairs(probs, routing_map, skip)
    assert torch.equal(new_probs, probs) and torch.equal(new_map, routing_map)


def _monotone_problem(n: int, m: int, seed: int):
    """kl and skip non-decreasing in both indices (random increments)."""
    g = torch.Generator().manual_seed(seed)
    kl = torch.rand(n, m, generator=g).cumsum(0).cumsum(1) / (n * m)
    skip = torch.rand(n, m, generator=g).cumsum(0).cumsum(1)
    skip = skip / skip.max()
    calls = []

    def evaluate(i, j):
        calls.append((i, j))
        return float(kl[i, j]), float(skip[i, j])
    return kl, skip, evaluate, calls


@pytest.mark.parametrize("seed", range(6))
def test_frontier_search_for_max_skip_matches_brute_force(seed):
    n, m = 9, 13
    kl, skip, evaluate, calls = _monotone_problem(n, m, seed)
    bound = float(kl.flatten().sort().values[(seed * 17) % (n * m)])
    found = max_skip_within_kl(evaluate, n, m, bound)
    feasible = [(float(skip[i, j]), -float(kl[i, j]), -i, i, j)
                for i, j in itertools.product(range(n), range(m)) if kl[i, j] <= bound]
    best = max(feasible)
    assert (found.i, found.j) == (best[3], best[4])
    assert found.kl <= bound and found.skip_ratio == float(skip[found.i, found.j])
    assert len(calls) == len(set(calls)) <= n + m  # the frontier, not the grid


@pytest.mark.parametrize("seed", range(6))
def test_frontier_search_for_a_target_skip_matches_brute_force(seed):
    n, m = 11, 7
    kl, skip, evaluate, calls = _monotone_problem(n, m, seed)
    target = 0.1 + 0.13 * seed
    found = min_kl_at_skip(evaluate, n, m, target)
    feasible = [(-float(kl[i, j]), float(skip[i, j]), -i, i, j)
                for i, j in itertools.product(range(n), range(m)) if skip[i, j] >= target]
    best = max(feasible)
    assert (found.i, found.j) == (best[3], best[4])
    assert len(calls) == len(set(calls)) <= 2 * n + m + 1  # linear, not n * m


def test_a_target_no_grid_point_reaches_is_none():
    _, _, evaluate, _ = _monotone_problem(4, 4, 0)
    assert min_kl_at_skip(evaluate, 4, 4, 1.5).i is None


def test_threshold_grid_spans_zero_to_top_densest_near_zero():
    grid = threshold_grid(0.8, 5)
    assert grid[0] == 0 and grid[-1] == pytest.approx(0.8) and grid == sorted(grid)
    assert grid[1] - grid[0] < grid[-1] - grid[-2]


def test_calibration_rows_are_deterministic_for_a_seed():
    a, b, c = (calibration_rows(1000, 64, s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 64 and bool((a.diff() > 0).all())
    with pytest.raises(ConfigError, match="modes.calibration_samples=2000 exceeds the 1000"):
        calibration_rows(1000, 2000, 0)


@pytest.mark.parametrize("field", ["text_threshold", "vision_threshold"])
@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_a_threshold_out_of_range_is_a_named_config_error(field, value):
    with pytest.raises(ConfigError, match=rf"modes\.{field}={value}: must be in \[0, 1\]"):
        load_config(None, [f"modes.{field}={value}"])
    with pytest.raises(ValueError, match="thresholds"):  # the skipper checks its own too
        from epruntime.modes import ExpertSkipper
        from epruntime.runtime import TokenStream

        ExpertSkipper(ModesConfig(), 2, TokenStream()).configure(True, None, (0.1, 2.0))


def _calibration(**model) -> Calibration:
    identity = {"fingerprint": "ab" * 32, "num_layers": 2, "num_experts": 8, "moe_topk": 3,
                **model}
    return Calibration(model=CalibratedModel(**identity), alpha=[[0.7, 0.6], [0.3, 0.4]],
                       text_threshold=0.1, vision_threshold=0.2)


def test_calibration_file_round_trips_and_names_what_is_wrong(tmp_path):
    path = _calibration().save(tmp_path / "c.json")
    calib = load_calibration(path, num_layers=2, num_experts=8, moe_topk=3)
    assert calib == _calibration()
    with pytest.raises(CalibrationError, match="no such file"):
        load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CalibrationError, match="bad.json: not a JSON file"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CalibrationError, match="not a MoDES calibration file"):
        load_calibration(tmp_path / "other.json")
    raw = json.loads(path.read_text())
    raw["text_threshold"] = 3
    (tmp_path / "range.json").write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="field text_threshold"):
        load_calibration(tmp_path / "range.json")
    # another model: its shapes, then its weights
    with pytest.raises(CalibrationError, match="calibrated for another model: "
                                               "model.num_layers=2 there, 4 here"):
        load_calibration(path, num_layers=4)
    with pytest.raises(CalibrationError, match="calibrated for other weights"):
        check_fingerprint(calib, "cd" * 32, path)


# ---- the model on real ranks --------------------------------------------------------------------
KINDS = ("dedup", "alltoall")
ALPHA = [[0.9, 0.7], [0.4, 0.6]]
THRESHOLDS = (0.25, 0.2)


def small_config(kind: str, *extra: str):
    return configs.small_config("parallel.ep_size=2", f"dispatch.kind={kind}", *extra)


def _pairs(engine) -> int:
    return sum(engine.comm_summary()["load_per_rank"])  # both layers, both ranks


def _model_worker(rank: int, out: str) -> None:
    """Both dispatchers on two ranks holding different batch sizes; records what the property
    tests below assert (one spawn for the module)."""
    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine
    from epruntime.model.vlm import init_weights_
    from epruntime.modes.calibrate import Calibrator, calibrate, model_identity
    from epruntime.modes.calibration import check_fingerprint
    from epruntime.modes.skip import skip_pairs

    env = distributed.init_distributed(small_config("dedup"))
    ds = SyntheticVQA(96, image_size=16, question_len=Q, seed=3)
    n = 3 if rank == 0 else 5  # ranks skip different numbers of pairs
    batch = ds.batch(torch.arange(rank * 8, rank * 8 + n))
    args = (batch.images, batch.question_ids, batch.question_lens)
    results = {"n": n}
    for kind in KINDS:
        distributed.seed_all(0)
        engine = Engine(small_config(kind), env, len(ds.vocab), ds.num_answers,
                        ds.max_question_len)
        model = engine.model.eval()
        skipper = model.skipper
        r = results[kind] = {}
        seen = []  # layer 0's routing as the router computed it, before skipping
        tap = model.router_tap
        with torch.no_grad():
            engine.ledger.reset()
            full = model(*args)
            r["full_pairs"] = _pairs(engine)
            tap.add("stats", lambda e: seen.append(e) if e.layer == 0 else None)
            skipper.configure(True, torch.tensor(ALPHA), (0.0, 0.0))
            engine.ledger.reset()
            r["zero_equal"] = torch.equal(model(*args), full)
            r["zero_pairs"] = _pairs(engine)
            r["zero_skipped"] = skipper.summary()["skipped_pairs"]
            routed = seen[-1]  # thresholds 0: what the router decided, untouched

            skipper.configure(True, torch.tensor(ALPHA), THRESHOLDS)
            skipper.reset_stats()
            model.reducer.reset_stats()
            engine.ledger.reset()
            skipped_logits = model(*args)
            r["changed"] = not torch.equal(skipped_logits, full)
            r["skip_pairs"] = _pairs(engine)
            r["summary"] = skipper.summary()
            r["flops"] = model.reducer.flops.summary()
            by_hand = skip_pairs(routed.probs_TE, routed.routing_map_TE, routed.modality_T,
                                 torch.tensor(ALPHA[0]), torch.tensor(THRESHOLDS))
            r["layer0_by_hand"] = [int(by_hand[routed.modality_T == m].sum()) for m in (0, 1)]
            r["layer0_seen_after"] = int(seen[-1].routing_map_TE.sum())
            r["layer0_routed"] = int(routed.routing_map_TE.sum())
            tap.remove("stats")

            # removal (calibration's alpha): layer 0 dispatches no pair of visual tokens
            skipper.configure(False)
            engine.ledger.reset()
            with skipper.removing(0, 1):
                model(*args)
            r["removed_pairs"] = _pairs(engine)
            skipper.configure(False)
            r["off_equal"] = torch.equal(model(*args), full)

        if kind == "dedup":  # calibration twice with one seed, once with another
            cfg = ModesConfig(calibration_samples=40, grid_points=5, kl_bound=1e-4,
                              calibration_seed=11)
            before = (skipper.enabled, skipper.thresholds, skipper.alpha_L2.tolist())
            first = calibrate(engine, ds, cfg, checkpoint="ckpt", step=0)
            again = calibrate(engine, ds, cfg, checkpoint="ckpt", step=0)
            other = Calibrator(engine, ds, cfg.model_copy(update={"calibration_seed": 12}))
            other.restore()
            r["calib"] = first.model_dump()
            r["calib_again"] = again.model_dump()
            same = Calibrator(engine, ds, cfg)
            same.restore()
            r["rows_same_seed"] = same.rows.tolist()
            r["rows_other_seed"] = other.rows.tolist()
            r["skipper_restored"] = before == (skipper.enabled, skipper.thresholds,
                                               skipper.alpha_L2.tolist())
            ident = model_identity(engine)
            r["fingerprint_matches"] = ident.fingerprint == first.model.fingerprint
            init_weights_(model, 999, 0.02, 2, env.ep_rank)  # other weights, same shapes
            try:
                check_fingerprint(first, model_identity(engine).fingerprint, "c.json")
                r["other_weights_error"] = None
            except CalibrationError as err:
                r["other_weights_error"] = str(err)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    """[rank] -> the worker's results, from one spawn of two ranks."""
    out = tmp_path_factory.mktemp("modes")
    spawn(_model_worker, 2, str(out))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


TOKENS = 8  # 3 + 5 samples on the two ranks


@pytest.mark.parametrize("kind", KINDS)
def test_zero_thresholds_reproduce_the_full_model_bit_for_bit(skipping, kind):
    for rank in range(2):
        r = skipping[rank][kind]
        assert r["zero_equal"] and r["off_equal"], rank
        assert r["zero_skipped"] == 0 and r["zero_pairs"] == r["full_pairs"]
    assert skipping[0][kind]["full_pairs"] == 2 * TOKENS * (Q + P) * K


@pytest.mark.parametrize("kind", KINDS)
def test_ledger_dispatches_text_k_plus_vision_k_minus_the_skipped_pairs(skipping, kind):
    for rank in range(2):
        r = skipping[rank][kind]
        s = r["summary"]
        text_k, vision_k = 2 * TOKENS * Q * K, 2 * TOKENS * P * K  # two layers
        assert s["routed_pairs"] == text_k + vision_k
        skipped = [sum(layer[f"{m}_skipped"] for layer in s["per_layer"])
                   for m in ("text", "vision")]
        assert min(skipped) > 0  # both thresholds skip something here
        assert r["skip_pairs"] == text_k + vision_k - s["skipped_pairs"]
        assert s["skipped_pairs"] == sum(skipped)
        assert s["skip_ratio"] == pytest.approx(s["skipped_pairs"] / (text_k + vision_k))
        assert r["changed"]


@pytest.mark.parametrize("kind", KINDS)
def test_layer_zero_skips_exactly_the_pairs_scored_under_the_threshold(skipping, kind):
    for rank in range(2):
        r = skipping[rank][kind]
        layer0 = r["summary"]["per_layer"][0]
        # the ranks' routings differ (3 vs 5 samples): this rank's pairs by hand, then the sum
        assert r["layer0_seen_after"] == r["layer0_routed"] - sum(r["layer0_by_hand"])
    for m, name in enumerate(("text", "vision")):
        assert sum(skipping[rank][kind]["layer0_by_hand"][m] for rank in range(2)) == \
            skipping[0][kind]["summary"]["per_layer"][0][f"{name}_skipped"]


@pytest.mark.parametrize("kind", KINDS)
def test_flops_count_only_the_pairs_that_ran(skipping, kind):
    d, f = 32, 16
    r = skipping[0][kind]
    for layer, counts in zip(r["flops"]["per_layer"], r["summary"]["per_layer"]):
        for m in ("text", "vision"):
            ran = counts[f"{m}_routed"] - counts[f"{m}_skipped"]
            assert layer["experts"][m] == ran * 4 * d * f
    assert r["flops"]["ratio"] < 1


@pytest.mark.parametrize("kind", KINDS)
def test_removing_a_layers_experts_for_a_modality_drops_all_its_pairs(skipping, kind):
    r = skipping[0][kind]
    assert r["removed_pairs"] == r["full_pairs"] - TOKENS * P * K


def test_calibration_is_deterministic_for_a_seed(skipping):
    for rank in range(2):
        r = skipping[rank]["dedup"]
        assert r["calib"] == r["calib_again"]
        assert r["rows_same_seed"] != r["rows_other_seed"]
        assert r["skipper_restored"]
    assert skipping[0]["dedup"]["calib"] == skipping[1]["dedup"]["calib"]  # one file, any rank
    calib = skipping[0]["dedup"]["calib"]
    fit = calib["fit"]
    alpha = torch.tensor(calib["alpha"])
    assert alpha.shape == (2, 2) and torch.allclose(alpha.sum(0), torch.ones(2, dtype=alpha.dtype))
    feasible = [e for e in fit["evaluated"] if e["kl"] <= fit["kl_bound"]]
    assert fit["kl"] <= fit["kl_bound"]
    assert fit["skip_ratio"] == max(e["skip_ratio"] for e in feasible)
    assert fit["samples"] == 40 and fit["split"] == "train"


def test_a_calibration_of_other_weights_is_refused(skipping):
    for rank in range(2):
        r = skipping[rank]["dedup"]
        assert r["fingerprint_matches"]
        assert "calibrated for other weights" in r["other_weights_error"]


# ---- the entry points: calibrate a checkpoint, serve it, refuse another model's file ------------
SMALL_SETS = [f"{k}" for k in configs.SMALL]


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_calibrate_then_infer_with_the_file_and_refuse_another_checkpoints(tmp_path):
    from tests.launch import check, run, summary, torchrun_cmd

    runs = {}
    for seed in (1, 2):  # two checkpoints of the same shapes, different weights
        runs[seed] = tmp_path / f"run{seed}"
        check(run(torchrun_cmd("epruntime.train", 2, *_sets(
            *SMALL_SETS, "parallel.ep_size=2", "train.max_steps=4",
            "train.checkpoint_interval=4", f"train.output_dir={runs[seed]}",
            "train.progress=false", "train.eval_at_end=false", f"train.seed={seed}",
            "data.synthetic_items=64", "data.max_eval_items=32"))))
    calib_file = tmp_path / "modes.json"
    check(run(torchrun_cmd("epruntime.modes.calibrate", 2, "--checkpoint", str(runs[1]),
                           "--out", str(calib_file), *_sets(
                               "modes.calibration_samples=24", "modes.grid_points=4",
                               "modes.kl_bound=0.001"))))
    calib = load_calibration(calib_file, num_layers=2)
    assert calib.fit["samples"] == 24 and calib.fit["kl"] <= 0.001

    def infer(checkpoint, name, *extra, ep=2):
        # EP=1 is one plain process (its exit code is the entry point's, not torchrun's)
        cmd = (torchrun_cmd("epruntime.infer", 2) if ep == 2 else
               [sys.executable, "-m", "epruntime.infer"])
        return run([*cmd, "--checkpoint", str(checkpoint), *_sets(
            "modes.enabled=true", f"modes.calibration={calib_file}", f"parallel.ep_size={ep}",
            f"infer.output_dir={tmp_path / name}", "data.eval_batch_size=32", *extra)])

    check(infer(runs[1], "infer"))
    s = summary(tmp_path / "infer")
    assert s["modes"]["text_threshold"] == calib.text_threshold
    assert s["modes"]["vision_threshold"] == calib.vision_threshold
    # 32 test items (16 per rank: no padding rows), 8 question tokens, 2 layers
    assert s["modes"]["routed_pairs"] == 2 * 32 * (P + 8) * K
    if s["modes"]["skipped_pairs"]:
        assert s["flops_ratio"] < 1
    # explicit thresholds override the file's; the file calibrated at EP=2 serves EP=1 too
    check(infer(runs[1], "override", "modes.text_threshold=0", "modes.vision_threshold=0", ep=1))
    assert summary(tmp_path / "override")["modes"]["skipped_pairs"] == 0

    other = infer(runs[2], "other", ep=1)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "epruntime.infer: error: modes.calibration=" in other.stderr
    assert "calibrated for other weights" in other.stderr
    bad = infer(runs[1], "bad", "modes.vision_threshold=1.5", ep=1)
    assert bad.returncode == 2 and "modes.vision_threshold=1.5: must be in [0, 1]" in bad.stderr

    # the benchmark's entry point on the same checkpoint (what the reducers table calls)
    from profiling.benchmarks.modes import evaluate_modes

    rows, details = evaluate_modes(runs[1], ep=2, eval_items=32, calibration_samples=24,
                                   kl_bound=0.001, grid_points=4, targets=(0.5,),
                                   timing_items=16, repeats=1, warmup=0,
                                   workdir=tmp_path / "bench")
    by_name = {r["variant"]: r for r in rows}
    assert list(by_name) == ["full", "modes@kl0.001", "modes@skip0.5"]
    full = by_name["full"]
    assert full["skip_ratio"] == 0 and full["flops_ratio"] == 1 and full["accuracy_retention"] == 1
    for name, r in by_name.items():
        assert {"eval_accuracy", "accuracy_retention", "flops_ratio", "dispatched_pairs",
                "cross_rank_bytes", "skip_ratio", "prefill_tokens_per_s"} <= r.keys(), name
        # every test pass routes the same text*k + vision*k pairs; the ledger sees the rest
        routed = full["dispatched_pairs"]
        assert r["dispatched_pairs"] == round(routed * (1 - r["skip_ratio"])), name
    assert by_name["modes@skip0.5"]["calibration_skip_ratio"] >= 0.5
    assert details["items"] == 32 and details["calibration_samples"] == 24
    assert len(details["calibrations"]) == 2
