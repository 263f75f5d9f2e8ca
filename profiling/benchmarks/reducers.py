"""Visual-token and expert reducers side by side on a deeper MoE-VLM (issue 17): accuracy, FLOPs,
prefill speed, dispatched pairs, cross-rank bytes and selection cost, one table per workload.

    python profiling/bench.py reducers --json profiling/results/reducers_ep2.json
    python profiling/bench.py reducers --workloads easy-vqa --variants fastmmoe@0.0625

For each workload an 8-layer model of its preset (`WORKLOADS`: `launch/configs/deep-vqa.yaml`,
conv stem, 64 visual tokens; `launch/configs/deep-scenes.yaml`, the pretrained frozen stem, 16
visual tokens) is trained once with the real entry point at EP=2 and cached under
`--workdir/<workload>/<model>` (default runs/bench-reducers), so reruns only evaluate. Workloads:
`easy-vqa`, and `scenes` (4x4 scenes of real Fashion-MNIST photos, epruntime.data.scenes;
generated, and the stem pretrained on training photos, into the workdir on first use). One set
of EP ranks per workload holds an engine per model and evaluates every variant on the same test
items (the models never trained on them):
- accuracy over `--eval-items` test items, its retention against `full`, analytic FLOPs and their
  ratio to the full model, visual tokens kept, (token, expert) pairs the experts computed and the
  ledger's cross-rank bytes, both per item;
- prefill tokens/s (prompt tokens over the slowest rank's forward time) and the host time spent
  choosing tokens, timed round-robin over all the variants of all the models (so drift hits all
  of them alike): median of `--repeats` passes over `--timing-items` items after `--warmup`
  untimed ones.

FastMMoE's k' (visual tokens' experts) is `--vision-topk`, or with `--choose-topk 1,2,3,4` fitted
per workload on training items (`_choose_worker`, `choose_topk`): the cheapest k' whose
`fastmmoe@0.25` keeps the goal's retention there, so the goal's row is scored on test items that
did not choose it. Candidates "N-above" keep every expert up to the pruning layer and k' = N
above it; `--choose-margin m` asks the retention to clear the goal by m paired standard errors
of the training items (the same items scored with and without the reducer).

LearnPruner's and QMoP's modules are trained with the model: each of their models is the base
checkpoint fine-tuned `--finetune-steps` steps with its module on (epruntime.compress.finetune;
cached beside the base), and `full+ft` is the base fine-tuned as many steps without a module, the
control for the extra training. MoDES is calibrated on training items of the base model.

Adding a method is one registry entry: `VARIANTS["fastv@0.4"] = Variant("fastv@0.4", "fastv",
apply_fn)`, where `apply_fn(engine, params)` sets the loaded model up for the variant on every
rank, after every registered `RESETS` function has turned all methods off; `model="name"` with
`MODELS["name"] = [overrides]` runs it on a model trained with those overrides (fine-tuned
from the base model when the name is in FINETUNED). Functions must be module-level (or partials of
them) so that spawned ranks can look them up by name.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, TINY_CONFIG, BenchResult, BenchUsageError, Spread, Subset,
                                add_checkpoint_options, collect_env, open_checkpoint, register,
                                resolve, spawn_ranks, trained_checkpoint)

DEEP_CONFIG = ROOT / "launch" / "configs" / "deep-vqa.yaml"
DEEP_SCENES_CONFIG = ROOT / "launch" / "configs" / "deep-scenes.yaml"
FULL = dict(ep=2, workloads="easy-vqa,scenes", steps=None, workdir=None, vision_topk=1, layer=0,
            choose_topk=None, choose_margin=0.0, choose_items=4096, eval_items=2048,
            timing_items=256, repeats=5, warmup=1, transport="pg",
            scenes_train=40000, scenes_test=1000, finetune_steps=100, finetune_lr=3e-4)
QUICK = dict(ep=2, workloads="easy-vqa", steps=2, workdir=None, vision_topk=1, layer=0,
             choose_topk=None, choose_margin=0.0, choose_items=64, eval_items=32,
             timing_items=16, repeats=1, warmup=0, transport="pg",
             scenes_train=256, scenes_test=16, finetune_steps=2, finetune_lr=1e-3)
BUDGETS = (0.5, 0.25, 0.125)  # visual-token retention of every pruning method
GOAL = dict(retention=0.955, flops_ratio=0.45, speedup=2.0)  # FastMMoE's, on the deep preset
CHOOSE_VARIANT = "fastmmoe@0.25"  # the goal's row: --choose-topk fits its k' on training items


# ---- registries ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str  # the row's label, e.g. "fastmmoe@0.25"
    method: str  # one plot line per method
    apply: Callable[[Any, dict], None]  # (engine, params): set the model up, on every rank
    model: str = "base"  # the trained model it runs on (MODELS)


def _fastmmoe_section(section: dict, engine, p: dict) -> None:
    from epruntime.config import FastMMoEConfig

    section = dict(section)
    if section.pop("reduced_topk", False):
        section["vision_topk"] = p["vision_topk"]
    if section.get("policy", "none") != "none":
        section["layers"] = [p["layer"]]
    engine.model.reducer.configure(FastMMoEConfig(**section))


def _fastmmoe_off(engine) -> None:
    from epruntime.config import FastMMoEConfig

    engine.model.reducer.configure(FastMMoEConfig(enabled=False))


def _pruning(policy: str, retention: float, reduced_topk: bool) -> Variant:
    section = {"enabled": True, "policy": policy, "retention": retention,
               "reduced_topk": reduced_topk}
    return Variant(f"{policy}@{retention:g}", policy, functools.partial(_fastmmoe_section, section))


def _modes_off(engine) -> None:
    engine.model.skipper.configure(False)


def _stage2(engine, p: dict) -> None:
    """LearnPruner's stage 2 (text-to-vision pruning after a middle layer) as its model was
    trained with it; QMoP's and LearnPruner's stage-1 modules are part of the trained model."""
    from epruntime.compress import reducer_config

    engine.model.reducer.configure(reducer_config(engine.cfg))


def _learned(method: str, budget: float) -> Variant:
    """learnpruner@r (stage 1 keeps r of the visual tokens, stage 2 a quarter of those after
    the middle layer) or qmop@r, each on its own model: the base model fine-tuned with the
    module (`--finetune-steps`)."""
    name = f"{method}@{budget:g}"
    MODELS[name] = [f"{method}.enabled=true", f"{method}.budget={budget:g}"]
    FINETUNED.add(name)
    return Variant(name, method, _stage2, model=name)


def _stage1_only(budget: float) -> Variant:
    """learnpruner-s1@r: LearnPruner's stage 1 alone (r of the visual tokens reach the language
    model, all of them to the last layer), on learnpruner@r's model with stage 2 off."""
    return Variant(f"learnpruner-s1@{budget:g}", "learnpruner-s1",
                   functools.partial(_fastmmoe_section, {"enabled": False}),
                   model=f"learnpruner@{budget:g}")


def _modes_apply(name: str, engine, p: dict) -> None:
    """MoDES at the thresholds of the variant's calibration file (written by `run` with
    python -m epruntime.modes.calibrate on the base checkpoint's training split)."""
    from epruntime.modes.calibration import load_calibration

    calib = load_calibration(p["calibrations"][name])
    engine.model.skipper.configure(True, calib.alpha_tensor(),
                                   (calib.text_threshold, calib.vision_threshold))


def _modes(name: str, calibrate_args: list[str]) -> Variant:
    CALIBRATIONS[name] = calibrate_args
    return Variant(name, "modes", functools.partial(_modes_apply, name))


MODELS: dict[str, list[str]] = {"base": [], "full+ft": []}  # model name -> training overrides on
#                                                              the workload's
# models fine-tuned from the base checkpoint (`--finetune-steps`) rather than trained from scratch;
# full+ft: the base model fine-tuned as many steps without a module (the extra training's control)
FINETUNED: set[str] = {"full+ft"}
RESETS: list[Callable[[Any], None]] = [_fastmmoe_off, _modes_off]  # every method off (run before
#                                                                     each apply)
# MoDES variant -> arguments of `python -m epruntime.modes.calibrate` (on the base checkpoint)
CALIBRATIONS: dict[str, list[str]] = {}
VARIANTS: dict[str, Variant] = {
    "full": Variant("full", "full", functools.partial(_fastmmoe_section, {"enabled": False})),
    "full+ft": Variant("full+ft", "full+ft", functools.partial(_fastmmoe_section,
                                                                {"enabled": False}),
                       model="full+ft"),
    "reduced": Variant("reduced", "fastmmoe", functools.partial(
        _fastmmoe_section, {"enabled": True, "policy": "none", "reduced_topk": True})),
    **{v.name: v for r in BUDGETS for v in (_pruning("fastmmoe", r, True),
                                             _pruning("fastv", r, False),
                                             _pruning("text2vision", r, False))},
    **{v.name: v for r in BUDGETS for v in (_learned("learnpruner", r), _learned("qmop", r),
                                             _stage1_only(r))},
    # MoDES: the highest skip ratio within the KL bound of modes.kl_bound (0.01), and the lowest
    # KL at two target skip ratios
    **{v.name: v for v in (_modes("modes@kl0.01", ["--set", "modes.kl_bound=0.01"]),
                           _modes("modes@skip0.5", ["--target-skip", "0.5"]),
                           _modes("modes@skip0.8", ["--target-skip", "0.8"]))},
}
DEFAULT_VARIANTS = ["full", "reduced", *(f"{m}@{r:g}" for m in ("fastmmoe", "fastv", "text2vision")
                                         for r in BUDGETS),
                    "full+ft", *(f"{m}@{r:g}" for m in ("learnpruner", "learnpruner-s1", "qmop")
                                 for r in BUDGETS),
                    "modes@kl0.01", "modes@skip0.5", "modes@skip0.8"]


def _fraction(text: str) -> float:
    """`text` as a number, or -1 where it is none (every caller wants one in [0, 1])."""
    try:
        return float(text)
    except ValueError:
        return -1.0


def variant(name: str) -> Variant:
    """A registered variant, or one built on the fly: `<fastmmoe|fastv|text2vision|random>@
    <retention>` (e.g. fastmmoe@0.0625), or `modes@skip<ratio>` (MoDES calibrated to the lowest
    KL at that skip ratio, e.g. modes@skip0.88, the paper's operating point)."""
    if name in VARIANTS:
        return VARIANTS[name]
    policy, _, arg = name.partition("@")
    if policy in ("fastmmoe", "fastv", "text2vision", "random") and 0 <= (r := _fraction(arg)) <= 1:
        return _pruning(policy, r, policy == "fastmmoe")
    skip = arg.removeprefix("skip")
    if policy == "modes" and skip != arg and 0 < _fraction(skip) < 1:
        return _modes(name, ["--target-skip", skip])
    raise BenchUsageError(f"unknown variant {name!r}: known {', '.join(VARIANTS)}, or "
                          "<fastmmoe|fastv|text2vision|random>@<retention in [0, 1]>, or "
                          "modes@skip<ratio in (0, 1)>")


# ---- workloads ----------------------------------------------------------------------------------
def _data_dir(work: Path, workload: str) -> Path:
    """Where a generated workload's JSONL splits and images live."""
    return work / workload / "data"


def _run_module(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")


def _scenes_data(work: Path, p: dict, quick: bool) -> list[str]:
    """Generate the scenes workload into the workdir once (4x4 scenes: one cell per vision token
    of the scenes preset), and pretrain the preset's stem there on training photos (not in
    --quick, whose tiny model has no pretrained stem); the data and encoder overrides."""
    data = _data_dir(work, "scenes")
    if not (data / "test.jsonl").is_file():
        _run_module(["epruntime.data.scenes", "--out", str(data), "--seed", "0", "--grid", "4",
                     "--train", str(p["scenes_train"]), "--test", str(p["scenes_test"])],
                    "generating the scenes workload")
    overrides = ["data.dataset=jsonl", f"data.train_jsonl={data / 'train.jsonl'}",
                 f"data.eval_jsonl={data / 'test.jsonl'}"]
    if quick:
        return overrides
    stem = work / "scenes" / "fashion_stem.pt"
    if not stem.is_file():
        _run_module(["epruntime.model.pretrain_vision", "--config", str(DEEP_SCENES_CONFIG),
                     "--out", str(stem), "--steps", "2000", "--seed", "0"],
                    "pretraining the scenes stem")
    return [*overrides, f"model.vision.pretrained={stem}"]


# workload -> (its 8-layer preset, what prepares its data once: (workdir, params, quick) ->
# overrides of the preset)
WORKLOADS: dict[str, tuple[Path, Callable[[Path, dict, bool], list[str]]]] = {
    "easy-vqa": (DEEP_CONFIG, lambda work, p, quick: []),
    "scenes": (DEEP_SCENES_CONFIG, _scenes_data),
}


def _split_records(workload: str, work: Path, split: str) -> list[dict]:
    """A workload's {"question", "answer", ...} records of `split` ("train" or "test"), in the
    order its dataset loads them."""
    if workload == "easy-vqa":
        from epruntime.data.vqa import easy_vqa_records

        return easy_vqa_records(split)
    from profiling.text_baselines import read_records

    return read_records(_data_dir(work, workload) / f"{split}.jsonl")


def question_only(workload: str, work: Path, items: int) -> dict:
    """What the question alone answers on the first `items` test items (the ones the table
    scores): the commonest training answer per question text, and the majority answer. A model
    whose accuracy sits at this floor is not using the image, whatever its visual tokens."""
    from profiling.text_baselines import baselines

    b = baselines(_split_records(workload, work, "train"),
                  _split_records(workload, work, "test")[:items])
    return {"question_only_accuracy": b["question_only"]["accuracy"],
            "majority_accuracy": b["majority"]["accuracy"]}


def _train(config: Path, work: Path, workload: str, model: str, data: list[str], p: dict,
           quick: bool) -> tuple[str, dict]:
    """The checkpoint of `model` on `workload`, made once under the workdir at EP=`ep`: trained
    with the real entry point, or (FINETUNED) fine-tuned from the base model's checkpoint."""
    if model not in FINETUNED:
        return trained_checkpoint(config, work / workload / model, p, quick,
                                  f"training {model} on {workload}", [*data, *MODELS[model]])
    base, _ = _train(config, work, workload, "base", data, p, quick)
    run_dir = work / workload / f"{model}-ft{p['finetune_steps']}"
    if not (run_dir / "summary.json").is_file():
        spawn_ranks(_finetune_worker, p["ep"], base, p, model, str(run_dir))
    return str(run_dir), json.loads((run_dir / "summary.json").read_text())


def _finetune_worker(rank: int, base: str, p: dict, model: str, run_dir: str) -> None:
    """Fine-tune the base checkpoint with `model`'s overrides (its module at initialisation,
    every other tensor from the base) for `finetune_steps` steps on the training split, and save
    it as a checkpoint of its own with a summary.json (what trained_checkpoint caches on)."""
    import time

    from epruntime import checkpoint as ckpt
    from epruntime import distributed
    from epruntime.compress import finetune as ft
    from epruntime.data import ShardedBatchIterator
    from epruntime.data.jsonl import DataVocab
    from profiling.benchmarks.compress import finetune_overrides

    steps = p["finetune_steps"]
    rs = open_checkpoint(base, p, [*finetune_overrides(steps, p["finetune_lr"]), *MODELS[model],
                                   f"train.output_dir={run_dir}"])
    distributed.seed_all(rs.cfg.train.seed)
    engine = rs.engine(load=False)
    t0 = time.perf_counter()
    ft.load_base_weights(engine, rs.path)
    batches = ShardedBatchIterator(rs.train_ds, rs.cfg.data.global_batch_size, rs.env.dp_rank,
                                   rs.env.dp_size, seed=rs.cfg.train.seed + 1)
    losses = ft.finetune(engine, batches, steps)
    seconds = time.perf_counter() - t0
    ckpt.save_checkpoint(engine, steps, batches.state_dict(),
                         {"data_vocab": DataVocab.of_dataset(rs.train_ds).to_dict()})
    if rank == 0:
        Path(run_dir, "summary.json").write_text(json.dumps({
            "steps": steps, "finetuned_from": str(rs.path), "base_steps": rs.meta["step"],
            "finetune_lr": p["finetune_lr"], "finetune_seconds": seconds,
            "first_loss": losses[0], "final_loss": losses[-1]}))


def _calibrate(checkpoint: str, name: str, p: dict) -> str:
    """The MoDES calibration file of variant `name` for `checkpoint` (fitted once, on training
    samples, with the real entry point at EP=`ep`; the table scores it on test items)."""
    out = Path(checkpoint) / f"{name.replace('@', '_')}.json"
    if not out.is_file():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={p['ep']}", "-m", "epruntime.modes.calibrate",
               "--checkpoint", checkpoint, "--out", str(out), *CALIBRATIONS[name]]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"calibrating {name} failed:\n{proc.stderr[-4000:]}")
    return str(out)


# ---- the ranks ---------------------------------------------------------------------------------
def configure(engine, name: str, p: dict) -> None:
    """Every method off (RESETS), then variant `name` on, for the loaded `engine`."""
    for reset in RESETS:
        reset(engine)
    variant(name).apply(engine, p)


def _worker(rank: int, checkpoints: dict[str, str], p: dict, names: list[str], out: str) -> None:
    """One set of ranks for every variant of a workload: an engine per model (`checkpoints`:
    model -> checkpoint, "base" first), so that the round-robin timing covers all of them."""
    import torch
    import torch.distributed as dist

    from epruntime.distributed import host_all_reduce

    rs = open_checkpoint(checkpoints["base"], p)
    engines = {model: rs.engine() if model == "base" else rs.other(path)
               for model, path in checkpoints.items()}
    eval_ds, batch = rs.eval_ds, rs.batch

    def setup(name: str):
        engine = engines[variant(name).model]
        configure(engine, name, p)
        return engine

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        host_all_reduce(t, group=dist.group.WORLD, op=dist.ReduceOp.MAX)
        return t.item()

    results: dict[str, dict] = {}
    for name in names:  # accuracy, FLOPs, pairs and bytes over the evaluation items
        m = setup(name).evaluate(eval_ds, batch)
        comm = m["comm"] or {}
        results[name] = {"eval_accuracy": m["eval_accuracy"], "items": m["eval_items"],
                         "flops": m["flops"]["total"], "flops_ratio": m["flops_ratio"],
                         "vision_tokens": m["vision_tokens"],
                         "vision_tokens_kept": m["vision_tokens_kept"],
                         "dispatched_pairs": sum(comm.get("load_per_rank", [])),
                         "cross_rank_bytes": comm.get("cross_rank_bytes"),
                         "tokens_per_s": [], "prefill_s": [], "selection_s": []}
    timing = Subset(eval_ds, p["timing_items"])
    for i in range(p["warmup"] + p["repeats"]):  # round-robin, so drift hits every variant
        for name in names:
            engine = setup(name)
            m = engine.evaluate(timing, batch)
            # of the pass just run (reset by evaluate)
            selection = slowest(engine.model.reducer.selection_s)
            if i >= p["warmup"]:
                r = results[name]
                r["tokens_per_s"].append(m["prefill_tokens_per_s"])
                r["prefill_s"].append(m["prefill_seconds"])
                r["selection_s"].append(selection)
    if rank == 0:
        Path(out).write_text(json.dumps({"results": results, "timing_items": len(timing),
                                         "seq_len": engines["base"].model.seq_len}))
    torch.distributed.barrier()


def parse_topk_specs(text: str) -> list[int | str]:
    """--choose-topk: "1,2,3,4,3-above" -> [1, 2, 3, 4, "3-above"]. N: k' = N in every layer;
    "N-above": k' = N above the pruning layer, every expert at and below it."""
    specs: list[int | str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        n = token.removesuffix("-above")
        if not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"--choose-topk: {token!r} is neither k' (a positive "
                                             "integer) nor 'k'-above'")
        spec = int(n) if n == token else f"{int(n)}-above"
        if spec not in specs:
            specs.append(spec)
    return specs


def topk_of_spec(spec: int | str, num_layers: int, topk: int, layer: int) -> int | list[int]:
    """fastmmoe.vision_topk for a --choose-topk candidate (parse_topk_specs) on a model of
    `num_layers` decoder layers with top-`topk` routing, pruning at `layer`."""
    if isinstance(spec, int):
        return spec
    k = int(spec.removesuffix("-above"))
    return [topk if i <= layer else k for i in range(num_layers)]


def paired_retention_se(hits_v: list[int], hits_full: list[int], goal: float) -> float:
    """Standard error of a variant's retention against `full` on the same items, paired:
    retention >= goal exactly when mean(d) >= 0 for d_i = hit_v,i - goal * hit_full,i, so the
    retention's standard error is SE(d) / accuracy(full)."""
    import torch

    d = torch.tensor(hits_v, dtype=torch.float64) - goal * torch.tensor(hits_full,
                                                                          dtype=torch.float64)
    full = sum(hits_full) / len(hits_full)
    return float(d.std(correction=1) / len(hits_v) ** 0.5 / full) if full else float("inf")


def _choose_worker(rank: int, base: str, p: dict, candidates: list[int | str], out: str) -> None:
    """CHOOSE_VARIANT at each candidate k' and `full` on `choose_items` training items spread
    over the split (never the test items the table scores): their accuracies, FLOPs and the
    paired standard error of their retention."""
    import torch

    rs = open_checkpoint(base, p)
    engine = rs.engine()
    items = Spread(rs.train_ds, p["choose_items"])
    configure(engine, "full", p)
    full = engine.evaluate(items, rs.batch, per_item=True)
    model_cfg = engine.cfg.model
    scores = {}
    for spec in candidates:
        k = topk_of_spec(spec, model_cfg.num_layers, model_cfg.moe_topk, p["layer"])
        configure(engine, CHOOSE_VARIANT, {**p, "vision_topk": k})
        m = engine.evaluate(items, rs.batch, per_item=True)
        scores[str(spec)] = {"eval_accuracy": m["eval_accuracy"], "flops_ratio": m["flops_ratio"],
                             "vision_topk": k, "retention_se": paired_retention_se(
                                 m["hits"], full["hits"], GOAL["retention"])}
    if rank == 0:
        Path(out).write_text(json.dumps({"items": full["eval_items"],
                                         "full_accuracy": full["eval_accuracy"],
                                         "candidates": scores}))
    torch.distributed.barrier()


def choose_topk(full_accuracy: float, candidates: dict, margin: float = 0.0):
    """The candidate with the fewest FLOPs among those whose retention (accuracy over full's,
    on the same training items) reaches GOAL's by `margin` paired standard errors
    (`retention_se`); the most accurate one when none does."""
    def retention(k) -> float:
        return candidates[k]["eval_accuracy"] / full_accuracy if full_accuracy else 0.0

    good = [k for k in candidates if retention(k) - margin * candidates[k].get(
        "retention_se", 0.0) >= GOAL["retention"]]
    if good:
        return min(good, key=lambda k: (candidates[k]["flops_ratio"], k))
    return max(candidates, key=lambda k: (retention(k), -candidates[k]["flops_ratio"]))


# ---- rows, tables, plot -------------------------------------------------------------------------
def build_rows(workload: str, results: dict[str, dict], names: list[str]) -> list[dict]:
    """Per-variant results of one workload (as the ranks report them) -> table rows; `full`
    must be among them (the reference of retention and speedup)."""
    full = results["full"]
    full_tps = statistics.median(full["tokens_per_s"])
    full_best = max(full["tokens_per_s"])
    rows = []
    for name in names:
        r = results[name]
        tps = statistics.median(r["tokens_per_s"])
        prefill = statistics.median(r["prefill_s"])
        selection = statistics.median(r["selection_s"])
        rows.append({
            "workload": workload, "variant": name, "method": variant(name).method,
            "eval_accuracy": r["eval_accuracy"],
            "accuracy_retention": (r["eval_accuracy"] / full["eval_accuracy"]
                                   if full["eval_accuracy"] else 0.0),
            "flops_ratio": r["flops_ratio"],
            "prefill_tokens_per_s": tps, "prefill_speedup": tps / full_tps,
            # the fastest pass of each (least disturbed by other jobs on a shared machine)
            "prefill_speedup_best": max(r["tokens_per_s"]) / full_best,
            "vision_tokens_kept": r["vision_tokens_kept"],
            "dispatched_pairs_per_item": r["dispatched_pairs"] / r["items"],
            "cross_rank_bytes_per_item": (r["cross_rank_bytes"] or 0) / r["items"],
            "selection_ms": 1e3 * selection,  # per timed pass, slowest rank
            "selection_fraction": selection / prefill if prefill else 0.0,
            "items": r["items"], "tokens_per_s_samples": r["tokens_per_s"],
            "selection_s_samples": r["selection_s"],
        })
    return rows


TABLE_COLUMNS = [("variant", "variant"), ("eval_accuracy", "acc"),
                 ("accuracy_retention", "retention"), ("flops_ratio", "FLOPs"),
                 ("prefill_tokens_per_s", "prefill tok/s"), ("prefill_speedup", "speedup"),
                 ("prefill_speedup_best", "best/best"),
                 ("vision_tokens_kept", "visual kept"), ("dispatched_pairs_per_item", "pairs/item"),
                 ("cross_rank_bytes_per_item", "x-rank B/item"), ("selection_ms", "select ms"),
                 ("selection_fraction", "select/prefill")]


def print_tables(rows: list[dict]) -> None:
    """One table per workload."""
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    for workload in dict.fromkeys(r["workload"] for r in rows):
        table = Table(title=f"reducers: {workload}", title_justify="left")
        for key, label in TABLE_COLUMNS:
            table.add_column(label, justify="left" if key == "variant" else "right")
        for r in (r for r in rows if r["workload"] == workload):
            cells = []
            for key, _ in TABLE_COLUMNS:
                v = r[key]
                cells.append(v if isinstance(v, str) else f"{100 * v:.2f}%" if key.endswith(
                    "fraction") else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")
            table.add_row(*cells)
        console.print(table)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy retention against FLOPs ratio, one line per method, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.4 * len(workloads), 4.6),
                             squeeze=False)
    full = {r["workload"]: r for r in rows if r["variant"] == "full"}
    for ax, workload in zip(axes[0], workloads):
        methods: dict[str, list[dict]] = {}
        for r in rows:
            if r["workload"] == workload and r["method"] != "full":
                methods.setdefault(r["method"], []).append(r)
        for (method, group), marker in zip(sorted(methods.items()), "osD^vP*Xh"):
            group = sorted(group, key=lambda r: r["flops_ratio"])
            ax.plot([r["flops_ratio"] for r in group], [r["accuracy_retention"] for r in group],
                    marker=marker, label=method)
            for r in group:
                ax.annotate(f"{r['variant'].partition('@')[2] or r['variant']} "
                            f"{r['prefill_speedup']:.1f}x",
                            (r["flops_ratio"], r["accuracy_retention"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        if workload in full:
            ax.plot([1.0], [1.0], "k*", label="full")
            if full[workload]["eval_accuracy"]:
                ax.axhline(full[workload]["question_only_accuracy"]
                           / full[workload]["eval_accuracy"], color="k", lw=0.8, ls=":",
                           label="question only (no image)")
        ax.axhline(GOAL["retention"], color="grey", lw=0.8, ls="--")
        ax.axvline(GOAL["flops_ratio"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("FLOPs ratio (vs full model)")
        ax.set_ylabel("accuracy retention (vs full)")
        ax.set_title(f"{workload} (labels: visual-token budget, prefill speedup)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_options(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_options(parser, FULL, checkpoint=False, transport=True,
                           variants="comma-separated variants instead of the default list (full "
                           "is always run), e.g. full,fastmmoe@0.125")
    parser.add_argument("--workloads", help="comma-separated: easy-vqa, scenes (default both)")
    parser.add_argument("--vision-topk", dest="vision_topk", type=int,
                        help="k' of visual tokens in reduced and fastmmoe variants (default 1)")
    parser.add_argument("--choose-topk", dest="choose_topk", type=parse_topk_specs,
                        help=f"comma-separated k' candidates (e.g. 1,2,3,4; 'N-above': k' = N "
                        "above the pruning layer only): per workload, score "
                        f"{CHOOSE_VARIANT} at each on --choose-items training items and run the "
                        "table at the cheapest k' whose retention there reaches the goal's "
                        f"{GOAL['retention']} (instead of --vision-topk)")
    parser.add_argument("--choose-margin", dest="choose_margin", type=float,
                        help="--choose-topk asks retention minus this many paired standard "
                        "errors (over the training items) to reach the goal (default 0)")
    parser.add_argument("--choose-items", dest="choose_items", type=int,
                        help="training items spread over the split for --choose-topk (default "
                        f"{FULL['choose_items']})")
    parser.add_argument("--layer", type=int, help="pruning layer (default 0)")
    parser.add_argument("--finetune-steps", dest="finetune_steps", type=int,
                        help="steps LearnPruner's and QMoP's models (and full+ft) are fine-tuned "
                        f"from the base model (default {FULL['finetune_steps']})")
    parser.add_argument("--finetune-lr", dest="finetune_lr", type=float,
                        help=f"peak LR of fine-tuning (default {FULL['finetune_lr']:g}, cosine "
                        "to a tenth)")
    parser.add_argument("--scenes-train", dest="scenes_train", type=int,
                        help="training scenes generated for the scenes workload (default "
                        f"{FULL['scenes_train']})")
    parser.add_argument("--scenes-test", dest="scenes_test", type=int,
                        help="test scenes generated for the scenes workload (default "
                        f"{FULL['scenes_test']})")


@register("reducers", add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Token/expert reducers on the 8-layer preset: accuracy, FLOPs, prefill, pairs, bytes."""
    p = resolve(args, FULL, QUICK)
    names = ([n for n in args.variants.split(",") if n] if getattr(args, "variants", None)
             else list(DEFAULT_VARIANTS))
    names = ["full"] + [n for n in names if n != "full"]
    for n in names:
        variant(n)  # a bad name fails here, before any training
    workloads = [w for w in p["workloads"].split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise BenchUsageError(f"--workloads {p['workloads']!r}: expected a comma-separated "
                              f"subset of {', '.join(WORKLOADS)}")
    if args.quick and not p["workdir"]:
        work = Path(tempfile.mkdtemp(prefix="bench-reducers-"))
    else:
        work = Path(p["workdir"] or ROOT / "runs" / "bench-reducers")
    rows, notes = [], []
    topk_choices: dict[str, dict] = {}  # workload -> --choose-topk's scores and choice
    configs: dict[str, str] = {}
    for workload in workloads:
        preset, prepare = WORKLOADS[workload]
        config = TINY_CONFIG if args.quick else preset
        configs[workload] = str(config.relative_to(ROOT))
        data = prepare(work, p, args.quick)
        models = list(dict.fromkeys(["base", *(variant(n).model for n in names)]))
        checkpoints, trained = {}, {}
        for model in models:  # trained or fine-tuned once, cached under the workdir
            checkpoints[model], trained[model] = _train(config, work, workload, model, data, p,
                                                        args.quick)
        calibrations = {n: _calibrate(checkpoints["base"], n, p) for n in names
                        if n in CALIBRATIONS}
        topk = p["vision_topk"]
        if p["choose_topk"]:
            chosen = work / workload / "topk_choice.json"
            spawn_ranks(_choose_worker, p["ep"], checkpoints["base"], p, p["choose_topk"],
                        str(chosen))
            choice = json.loads(chosen.read_text())
            cands = {(int(k) if k.isdigit() else k): v for k, v in choice["candidates"].items()}
            chosen_spec = choose_topk(choice["full_accuracy"], cands, p["choose_margin"])
            topk = cands[chosen_spec]["vision_topk"]
            topk_choices[workload] = {**choice, "chosen": chosen_spec, "margin": p["choose_margin"]}
            notes.append(f"{workload}: k' = {chosen_spec} chosen on {choice['items']} training "
                         f"items (full {choice['full_accuracy']:.4f}; {CHOOSE_VARIANT} at k' = "
                         + ", ".join(f"{k}: {v['eval_accuracy']:.4f} "
                                     f"({v['eval_accuracy'] / choice['full_accuracy']:.4f} "
                                     f"+- {v['retention_se']:.4f}, FLOPs {v['flops_ratio']:.3f})"
                                     for k, v in cands.items())
                         + f"): the cheapest with retention - {p['choose_margin']:g} x its paired "
                         f"standard error >= {GOAL['retention']}")
        out = work / workload / "results.json"
        spawn_ranks(_worker, p["ep"], checkpoints,
                    {**p, "vision_topk": topk, "calibrations": calibrations}, names, str(out))
        got = json.loads(out.read_text())
        results = got["results"]
        for model in models:
            t = trained[model]
            notes.append(f"{workload}/{model}: {checkpoints[model]} ("
                         + (f"base fine-tuned {t['steps']} steps at lr {t['finetune_lr']:g}, "
                            f"{t['finetune_seconds']:.0f} s, loss {t['first_loss']:.3f} -> "
                            f"{t['final_loss']:.3f})" if model in FINETUNED
                            else f"{t['steps']} training steps)"))
        notes.append(f"{workload}: prefill timed on {got['timing_items']} items x "
                     f"{p['repeats']} round-robin repeats over every variant, {got['seq_len']} "
                     "prompt tokens per item; accuracy on test items; MoDES calibrated on "
                     "training items")
        floor = question_only(workload, work, results["full"]["items"])
        notes.append(f"{workload}: without the image, the commonest training answer per question "
                     f"text gets {floor['question_only_accuracy']:.4f} on the same test items "
                     f"(majority answer {floor['majority_accuracy']:.4f})")
        rows += [{**r, **floor, "vision_topk": topk} for r in build_rows(workload, results, names)]
    print_tables(rows)
    png = Path(args.json).with_suffix(".png") if args.json else work / "reducers.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    goal = [r for r in rows if r["method"] == "fastmmoe"
            and r["accuracy_retention"] >= GOAL["retention"]
            and r["flops_ratio"] <= GOAL["flops_ratio"] and r["prefill_speedup"] >= GOAL["speedup"]]
    notes += [f"plot: {png}",
              "goal (fastmmoe: retention >= 0.955 at flops_ratio <= 0.45 and >= 2x prefill): "
              + (", ".join(f"{r['workload']}/{r['variant']} ({r['accuracy_retention']:.3f}, "
                           f"{r['flops_ratio']:.3f}, {r['prefill_speedup']:.2f}x)" for r in goal)
                 or "not met by any fastmmoe variant"),
              "selection_ms: host time choosing tokens per timed pass (slowest rank); "
              "selection_fraction: of the variant's prefill time"]
    ratios = {f"{r['workload']}/{r['variant']}/full_prefill_tokens_per_s": r["prefill_speedup"]
              for r in rows if r["variant"] != "full"}
    params = {**{k: v for k, v in p.items() if k != "workdir"}, "variants": names,
              "topk_choice": topk_choices,
              # k' as run: with --choose-topk, each workload's choice
              "vision_topk": ({w: c["chosen"] for w, c in topk_choices.items()} if topk_choices
                              else p["vision_topk"]),
              "config": configs, "quick": bool(args.quick)}
    return BenchResult(name="reducers", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
