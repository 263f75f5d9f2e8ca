"""Token dispatch side by side: megatron-core's alltoall dispatcher against epruntime's rank-dedup
dispatcher under contiguous, SMoES-bin and traffic-aware placement, on the same trained model,
weights and inputs, EP over CPU ranks (gloo).

Two models are trained first with the real entry point (`torchrun -m epruntime.train`), same seed
and data: a baseline (megatron-core's TopKRouter) and an SMoES model (Gaussian modality scores).
Then one set of ranks loads them and, round-robin over the variants, times a full forward+backward
of the MoE-VLM on one fixed batch (median of repeats; a step lasts as long as its slowest rank).
Bytes and rows come from the CommLedger of one forward pass over the same batch.

Communication time (issue 18): every engine runs with the phase timer on (`dispatch.timing=on`,
epruntime.dispatch.timing) and the ledger off while timed; `comm_seconds` is the seconds one
forward+backward spent in the MoE layers' dispatch and combine phases (layout, wait for the
slowest peer, permute, collective, combine), summed over layers, on the slowest rank, median of
repeats; `detail.comm_time` breaks down the mean over repeats by direction, phase and part.

Variants on the SMoES model: `megatron-alltoall`, `dedup`, `dedup+bins` (bin k moved onto rank k
by live migration), `dedup+traffic` (traffic-aware placement from co-activation recorded on
training batches), `dedup+traffic+shm` (the same over the shared-memory transport). The paper's end-to-end comparison (arXiv 2604.23996: 56.1% fewer EP bytes,
+12.3% throughput) is `baseline:megatron-alltoall` against `dedup+bins`; `baseline:dedup+traffic`
shows what placement alone does for a model trained without SMoES.

`--preset NAME` (issue 14): the model is `launch/configs/presets/NAME.yaml` as it is (its shape
and router; no SMoES), trained once, and the variants are `megatron-alltoall`, `dedup` and
`dedup+traffic` on it: the dispatch table (bytes, rows, floor, balancedness, tokens/s) of that
architecture's routing structure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import (ROOT, TINY_CONFIG, BenchResult, BenchUsageError, collect_env,
                                register, resolve, spawn_ranks, torchrun_train)

SHAPES = {
    # Fine-grained like DeepSeekMoE (64 experts, top-6), small hidden size for 2 cores.
    "fine": ["model.num_experts=64", "model.moe_topk=6", "model.moe_ffn_hidden_size=32"],
    "tiny": [],  # the embedded default: 32 experts, top-4
}
MODELS = {"baseline": [], "smoes": ["smoes.enabled=true", "smoes.score=gaussian"]}
VARIANTS = {  # name: (model, dispatch.kind, placement[, dispatch.transport])
    "megatron-alltoall": ("smoes", "alltoall", "contiguous"),
    "dedup": ("smoes", "dedup", "contiguous"),
    "dedup+bins": ("smoes", "dedup", "bins"),
    "dedup+traffic": ("smoes", "dedup", "traffic"),
    "dedup+traffic+shm": ("smoes", "dedup", "traffic", "shm"),
    "baseline:megatron-alltoall": ("baseline", "alltoall", "contiguous"),
    "baseline:dedup+traffic": ("baseline", "dedup", "traffic"),
    "baseline:dedup+traffic+shm": ("baseline", "dedup", "traffic", "shm"),
}
PRESET_DIR = ROOT / "launch" / "configs" / "presets"
PRESET_MODELS = {"preset": []}  # the preset's own model and router
PRESET_VARIANTS = {"megatron-alltoall": ("preset", "alltoall", "contiguous"),
                   "dedup": ("preset", "dedup", "contiguous"),
                   "dedup+traffic": ("preset", "dedup", "traffic")}
FULL = dict(ep=4, shape="fine", steps=600, samples=32, repeats=7, warmup=2, calib_batches=8,
            workdir=None, mi_coeff=None, preset=None, max_imbalance=1.1, timing="on")
QUICK = dict(ep=2, shape="tiny", steps=4, samples=4, repeats=2, warmup=1, calib_batches=1,
             workdir=None, mi_coeff=None, preset=None, max_imbalance=1.1, timing="on")
# With --preset: a fixed architecture, fewer training steps (the table is about its routing).
PRESET_FULL = dict(FULL, steps=100, samples=16, repeats=5)
ROW_KEYS = ("cross_rank_bytes", "rows_sent", "floor_rows", "balancedness")
DETAIL_KEYS = ("expert_rows", "payload_bytes", "meta_bytes", "control_bytes", "local_bytes",
               "intra_node_bytes", "inter_node_bytes")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int, help="EP size = ranks (default 4)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="fine (64 experts top-6, default) "
                        "or tiny (the tiny-vqa model, 32 experts top-4)")
    parser.add_argument("--steps", type=int, help="training steps of both models (default 600)")
    parser.add_argument("--samples", type=int, help="samples per rank in the timed batch")
    parser.add_argument("--calib-batches", dest="calib_batches", type=int,
                        help="training batches recorded for traffic-aware placement")
    parser.add_argument("--workdir", help="keep trained checkpoints here and reuse them")
    parser.add_argument("--mi-coeff", dest="mi_coeff", type=float,
                        help="smoes.mi_coeff of the SMoES model (default: the paper's 1e-4)")
    parser.add_argument("--max-imbalance", dest="max_imbalance", type=float,
                        help="load cap of the traffic-aware placement, a factor over the mean "
                        "rank load on the calibration batches (default 1.1)")
    parser.add_argument("--timing", choices=["on", "barrier"],
                        help="dispatch.timing while timed (default on). barrier: a timed barrier "
                        "before every collective, so `collective` is pure transfer; at EP=2 the "
                        "rows then also get `time_model`, the cpu-gloo / cpu-shm presets refitted "
                        "on this run's uniform all-to-alls against the measured collectives")
    parser.add_argument("--preset", help="an architecture preset, launch/configs/presets/"
                        "NAME.yaml: its model, megatron-alltoall vs dedup vs dedup+traffic")


def _config_path(p: dict[str, Any]) -> Path:
    return PRESET_DIR / f"{p['preset']}.yaml" if p["preset"] else TINY_CONFIG


def _models(p: dict[str, Any]) -> dict[str, list[str]]:
    return PRESET_MODELS if p["preset"] else MODELS


def _variants(p: dict[str, Any]) -> dict[str, tuple]:
    return PRESET_VARIANTS if p["preset"] else VARIANTS


def _shape(p: dict[str, Any]) -> list[str]:
    return [] if p["preset"] else SHAPES[p["shape"]]


def _model_overrides(p: dict[str, Any], model: str) -> list[str]:
    extra = list(_models(p)[model])
    if model == "smoes" and p["mi_coeff"] is not None:
        extra.append(f"smoes.mi_coeff={p['mi_coeff']}")
    return extra


def _common(p: dict[str, Any]) -> list[str]:
    return [*_shape(p), f"parallel.ep_size={p['ep']}", "train.progress=false",
            f"train.max_steps={p['steps']}", f"train.checkpoint_interval={p['steps']}",
            "data.max_eval_items=1024"]


def _trained(p: dict[str, Any], workdir: Path) -> dict[str, dict]:
    """Train (or reuse) the baseline and SMoES checkpoints; their training summaries."""
    out = {}
    for model in _models(p):
        overrides = [*_common(p), *_model_overrides(p, model)]
        tag = f"{p['preset'] or p['shape']}-ep{p['ep']}-s{p['steps']}-{model}"
        if model == "smoes" and p["mi_coeff"] is not None:
            tag += f"-mi{p['mi_coeff']:g}"
        run_dir = workdir / tag
        summary = run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("steps") == p["steps"]:
            out[model] = json.loads(summary.read_text())
        else:
            print(f"dispatch: training {tag}...", file=sys.stderr, flush=True)
            out[model] = torchrun_train(_config_path(p), [*overrides, f"train.output_dir={run_dir}"],
                                        p["ep"], tag)
        out[model]["dir"] = str(run_dir)
    return out


def _measure(rank: int, p: dict[str, Any], dirs: dict[str, str], result_path: str) -> None:
    import torch
    import torch.distributed as dist

    from epruntime import checkpoint, distributed
    from epruntime.config import load_config
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine
    from epruntime.placement.controller import bin_placements, place
    from epruntime.placement.recording import CoactivationRecorder, traffic_placements

    def config(model: str, kind: str, transport: str = "pg"):
        return load_config(_config_path(p), [*_common(p), *_model_overrides(p, model),
                                         f"dispatch.kind={kind}", f"dispatch.transport={transport}",
                                         f"dispatch.timing={p['timing']}"])

    first = next(iter(_models(p)))
    env = distributed.init_distributed(config(first, "alltoall"))
    train_ds, eval_ds = build_datasets(config(first, "alltoall"))
    world, per_rank = env.world_size, p["samples"]
    batch = eval_ds.batch(torch.arange(rank * per_rank, (rank + 1) * per_rank))
    global_batch = per_rank * world

    engines, rows = {}, {}
    variants = _variants(p)
    for name, (model, kind, placement, *transport) in variants.items():
        distributed.seed_all(0)
        cfg = config(model, kind, *transport)
        engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers,
                        train_ds.max_question_len)
        checkpoint.load_checkpoint(engine, Path(dirs[model]) / "checkpoints" / f"step_{p['steps']:06d}",
                                   restore_training_state=False)
        row: dict[str, Any] = {"variant": name}
        detail: dict[str, Any] = {"model": model, "dispatcher": kind, "placement": placement,
                                  "transport": cfg.dispatch.transport}
        if placement != "contiguous":
            if placement == "bins":
                target = bin_placements(engine)
            else:
                recorder = CoactivationRecorder(engine.model)
                with torch.no_grad():
                    for i in range(p["calib_batches"]):
                        idx = torch.arange((i * world + rank) * per_rank,
                                           (i * world + rank + 1) * per_rank)
                        engine.model(*_inputs(train_ds.batch(idx)))
                recorder.close()
                target = traffic_placements(recorder.counts(dist.group.WORLD), env.ep_size,
                                            engine.ranks_per_node,
                                            max_imbalance=p["max_imbalance"],
                                            num_groups=cfg.model.moe_router_num_groups)
            report = place(engine, target)
            detail["migration_bytes_sent"] = report["bytes_sent"] if report else 0
            detail["migration_s"] = report["seconds"] if report else 0.0
        engine.ledger.reset()
        with torch.no_grad():
            engine.model(*_inputs(batch))
        comm = engine.comm_summary()
        row.update({k: comm[k] for k in ROW_KEYS})
        row["detail"] = {**detail, **{k: comm[k] for k in DETAIL_KEYS}}
        if p["timing"] == "barrier":  # [layer, phase, src, dst] bytes for the time model
            t = engine.ledger.totals(dist.group.WORLD)
            row["detail"]["traffic_LPRR"] = {"payload": t.payload_bytes.tolist(),
                                             "meta": t.meta_bytes.tolist()}
        engines[name], rows[name] = engine, row

    # Round-robin so that drift of a noisy host spreads over every variant alike. The ledger is
    # off while timed (its row plan for megatron-core's dispatcher is not megatron-core's cost).
    samples = {name: [] for name in variants}
    comm = {name: [] for name in variants}
    parts = {name: torch.zeros_like(engine.timer.seconds) for name, engine in engines.items()}
    for i in range(p["warmup"] + p["repeats"]):
        for name, engine in engines.items():
            engine.timer.reset()
            dist.barrier()
            start = time.perf_counter()
            with engine.observers.observing(None):
                engine.forward_backward(batch, global_batch)
            elapsed = torch.tensor([time.perf_counter() - start, engine.timer.total_seconds()])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= p["warmup"]:
                samples[name].append(elapsed[0].item())
                comm[name].append(elapsed[1].item())
                parts[name] += engine.timer.seconds
    tokens = global_batch * engines["dedup"].model.seq_len
    for name, row in rows.items():
        row["step_time_s"] = statistics.median(samples[name])
        row["tokens_per_s"] = tokens / row["step_time_s"]
        row["tokens_per_step"] = tokens
        row["samples"] = samples[name]
        row["comm_seconds"] = statistics.median(comm[name])
        # The least-disturbed repeat: on a shared host the spread of repeats is mostly other
        # processes' load, which a median of few repeats does not remove.
        row["comm_seconds_min"] = min(comm[name])
        row["comm_share"] = row["comm_seconds"] / row["step_time_s"]
        row["comm_samples"] = comm[name]
        timer = engines[name].timer
        timer.seconds = parts[name] / p["repeats"]  # mean per step, every rank's own
        row["detail"]["comm_time"] = timer.summary(dist.group.WORLD)
    fit_rows = []
    if p["timing"] == "barrier" and world == 2:  # after the timed repeats: they stay undisturbed
        from profiling.benchmarks.calibration import uniform_fit_rows
        fit_rows = uniform_fit_rows(rank, world, p["repeats"])
    if rank == 0:
        Path(result_path).write_text(json.dumps({"rows": list(rows.values()),
                                                 "fit_rows": fit_rows}))


def _inputs(batch):
    return batch.images, batch.question_ids, batch.question_lens


@register("dispatch", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """megatron-core alltoall vs dedup dispatch x placement: bytes, rows, step time."""
    preset = getattr(args, "preset", None)
    if preset is not None and not (PRESET_DIR / f"{preset}.yaml").is_file():
        known = ", ".join(sorted(f.stem for f in PRESET_DIR.glob("*.yaml"))) or "(none)"
        raise BenchUsageError(f"--preset {preset}: no file {PRESET_DIR.relative_to(ROOT)}/"
                              f"{preset}.yaml; known presets: {known}")
    p = resolve(args, PRESET_FULL if preset else FULL, QUICK)
    if p["ep"] < 2:
        raise BenchUsageError(f"--ep must be at least 2 (dispatch needs remote ranks), got {p['ep']}")
    with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as tmp:
        workdir = Path(p["workdir"]) if p["workdir"] else Path(tmp)
        trained = _trained(p, workdir)
        result_file = Path(tmp) / "rows.json"
        spawn_ranks(_measure, p["ep"], p, {m: t["dir"] for m, t in trained.items()},
                    str(result_file))
        measured = json.loads(result_file.read_text())
    rows = measured["rows"]
    for row in rows:
        s = trained[row["detail"]["model"]]
        row.update(eval_accuracy=s.get("eval_accuracy"), msi=s.get("msi"))
    by = {r["variant"]: r for r in rows}
    ref = by["megatron-alltoall"]
    ratios = {}
    for r in rows:
        if r is not ref and not r["variant"].startswith("baseline:"):
            for key in ("cross_rank_bytes", "rows_sent", "tokens_per_s", "comm_seconds",
                        "comm_seconds_min"):
                ratios[f"{r['variant']}/megatron-alltoall_{key}"] = r[key] / ref[key]
    ratios["dedup+traffic/floor_rows_of_megatron-placement"] = (
        by["dedup+traffic"]["rows_sent"] / ref["floor_rows"])
    if measured["fit_rows"]:
        for variant, split in time_models(rows, measured["fit_rows"]).items():
            tm = by[variant]["time_model"]
            ratios[f"{variant}/time_model_microbench_relative_error"] = (
                tm["microbench"]["relative_error"])
            ratios[f"{variant}/time_model_in_situ_relative_error_{split}"] = (
                tm["in_situ"]["relative_error"])
    if p["preset"]:
        return _result(args, p, rows, ratios)
    base = by["baseline:megatron-alltoall"]
    for key in ("cross_rank_bytes", "tokens_per_s"):
        ratios[f"e2e:dedup+bins/baseline:megatron-alltoall_{key}"] = by["dedup+bins"][key] / base[key]
    ratios["e2e:dedup+traffic+shm/baseline:megatron-alltoall_tokens_per_s"] = (
        by["dedup+traffic+shm"]["tokens_per_s"] / base["tokens_per_s"])
    ratios["e2e:dedup+traffic+shm/baseline:megatron-alltoall_comm_seconds"] = (
        by["dedup+traffic+shm"]["comm_seconds"] / base["comm_seconds"])
    ratios["dedup+traffic+shm/dedup+traffic_tokens_per_s"] = (
        by["dedup+traffic+shm"]["tokens_per_s"] / by["dedup+traffic"]["tokens_per_s"])
    return _result(args, p, rows, ratios)


def phase_collectives(kind: str, payload_PRR, meta_PRR) -> dict[tuple[str, str], list]:
    """The all-to-alls one layer's phases make, as [R, R] (src, dst) byte matrices, from the
    ledger's [phase, R, R] payload and metadata bytes: megatron-core sends the probs apart from
    the rows; the dedup dispatcher exchanges its [R] split counts first, then rows and metadata
    packed in one (float32 model, `Hop.packed`). Backward sends the gradients the reverse way."""
    import torch

    from epruntime.dispatch.plan import COUNT_BYTES

    rows, meta, back = payload_PRR[0], meta_PRR[0], payload_PRR[1] + meta_PRR[1]
    if kind == "alltoall":
        forward, backward = [rows, meta], [rows.t(), meta.t()]
    else:
        counts = (1 - torch.eye(rows.shape[0], dtype=rows.dtype)) * COUNT_BYTES
        forward, backward = [counts, rows + meta], [(rows + meta).t()]
    return {("forward", "dispatch"): forward, ("forward", "combine"): [back],
            ("backward", "dispatch"): backward, ("backward", "combine"): [back.t()]}


def _cells(row: dict) -> list[tuple[str, list, float]]:
    """(direction/phase, its all-to-alls [R, R], measured collective seconds) of every layer of
    a --timing barrier row (the slowest rank's per-layer parts)."""
    import torch

    detail = row["detail"]
    payload = torch.tensor(detail["traffic_LPRR"]["payload"], dtype=torch.float64)
    meta = torch.tensor(detail["traffic_LPRR"]["meta"], dtype=torch.float64)
    per_layer = detail["comm_time"]["per_layer"]
    return [(f"{direction}/{phase}", mats, per_layer[layer][direction][phase]["collective"])
            for layer in range(payload.shape[0])
            for (direction, phase), mats in phase_collectives(
                detail["dispatcher"], payload[layer], meta[layer]).items()]


def _transport(row: dict) -> str:
    return "shm" if row["detail"]["transport"] == "shm" else "gloo"


def fit_in_situ(rows: list[dict], micro, name: str):
    """`micro` (the preset refitted on uniform back-to-back all-to-alls) with its fixed cost
    refitted by least squares on the measured collectives of `rows`: each layer's phase of n
    all-to-alls takes n * fixed + its bytes at micro's bandwidth. One parameter: this run's
    phases all move 0.1-0.7 MB per rank, too narrow a range to fit a bandwidth on."""
    from epruntime.scale.timemodel import phase_seconds

    key = "latency" if micro.latency > 0 else "message_latency"
    no_fixed = micro.model_copy(update={key: 0.0})
    num = den = 0.0
    for row in rows:
        ep = len(row["detail"]["traffic_LPRR"]["payload"][0][0])
        for phase, mats, measured in _cells(row):
            n = sum(1 for m in mats if float(m.sum() - m.diagonal().sum()) > 0)
            num += n * (measured - phase_seconds(mats, ep, no_fixed, phase.split("/")[1]))
            den += n * n
    fixed = num / den
    if fixed < 0:
        raise BenchUsageError(f"--timing barrier: the in-situ fixed cost of {micro.name} came out "
                              f"negative ({fixed:.2e} s): the measurement is too noisy, run again")
    return micro.model_copy(update={
        "name": name, key: fixed,
        "fitted": f"bandwidth: {micro.fitted}; {key}: least squares on the per-layer "
                  "collectives of " + ", ".join(r["variant"] for r in rows)})


def predict(row: dict, preset) -> dict:
    """`preset`'s seconds for this row's collectives against the measured ones, per
    direction/phase and in all (forward + backward, all layers)."""
    from epruntime.scale.timemodel import phase_seconds

    ep = len(row["detail"]["traffic_LPRR"]["payload"][0][0])
    phases: dict[str, dict] = {}
    for key, mats, measured in _cells(row):
        cell = phases.setdefault(key, {"predicted_s": 0.0, "measured_s": 0.0, "collectives": 0})
        cell["predicted_s"] += phase_seconds(mats, ep, preset, key.split("/")[1])
        cell["measured_s"] += measured
        cell["collectives"] += len(mats)
    for cell in phases.values():
        cell["relative_error"] = cell["predicted_s"] / cell["measured_s"] - 1
    predicted = sum(c["predicted_s"] for c in phases.values())
    measured = sum(c["measured_s"] for c in phases.values())
    return {"preset": preset.name, "fitted": preset.fitted,
            "bandwidth_GBps": preset.intra_bandwidth / 1e9,
            "fixed_us": max(preset.latency, preset.message_latency) * 1e6,
            "predicted_s": predicted, "measured_s": measured,
            "relative_error": predicted / measured - 1, "phases": phases}


def time_models(rows: list[dict], fit_rows: list[dict]) -> dict[str, str]:
    """Each row's `time_model`, two ways:
    - `microbench`: the preset refitted on this run's uniform back-to-back all-to-alls (what
      `bench.py calibration --measure` validates);
    - `in_situ`: the same bandwidth, the fixed cost per collective fitted on the SMoES model's
      variants' own collectives of the transport, scored on the other model's (`baseline:*`,
      other routing and bytes); `in_situ_split` says which.
    Returns {variant: split}."""
    from epruntime.scale.calibrate import fitted_cpu_preset

    splits = {}
    for transport in ("gloo", "shm"):
        mine = [r for r in rows if _transport(r) == transport]
        fit = [r for r in mine if not r["variant"].startswith("baseline:")]
        sizes = tuple(sorted(r["bytes"] for r in fit_rows if r["transport"] == transport))
        micro = fitted_cpu_preset(fit_rows, transport, sizes, f"cpu-{transport}@this-run")
        situ = fit_in_situ(fit, micro, f"cpu-{transport}@in-situ")
        for r in mine:
            splits[r["variant"]] = "fit" if r in fit else "score"
            r["time_model"] = {"microbench": predict(r, micro), "in_situ": predict(r, situ),
                               "in_situ_split": splits[r["variant"]]}
    return splits


def _result(args, p: dict[str, Any], rows: list[dict], ratios: dict) -> BenchResult:
    by = {r["variant"]: r for r in rows}
    params = {"preset": p["preset"], "shape": None if p["preset"] else p["shape"],
              "shape_overrides": _shape(p), "ep_size": p["ep"],
              "train_steps": p["steps"], "samples_per_rank": p["samples"],
              "tokens_per_step": by["megatron-alltoall"]["tokens_per_step"], "repeats": p["repeats"],
              "warmup": p["warmup"], "calib_batches": p["calib_batches"], "timing": p["timing"],
              "smoes_mi_coeff": p["mi_coeff"] if p["mi_coeff"] is not None else "config",
              "config": str(_config_path(p).relative_to(ROOT)), "quick": bool(args.quick)}
    notes = ["cross_rank_bytes: forward dispatch + combine payload and metadata between different "
             "ranks (backward mirrors it); rows_sent/floor_rows/expert_rows: dispatch rows off-rank",
             "step_time_s: forward+backward of the whole MoE-VLM incl. dense-gradient all-reduce, "
             "median of repeats, slowest rank",
             "comm_seconds: seconds of one forward+backward in the MoE dispatch/combine phases "
             "(layout, wait, permute, collective, combine; epruntime.dispatch.timing, perf_counter),"
             " all layers, slowest rank, median of repeats; ledger off and timing on while timed"]
    if any("time_model" in r for r in rows):
        notes.append("time_model: the cpu-gloo / cpu-shm time model (epruntime.scale.timemodel) "
                     "against the measured `collective` parts (timing=barrier: transfer only); "
                     "microbench: preset refitted on this run's uniform back-to-back all-to-alls; "
                     "in_situ: its fixed cost per collective refitted on the SMoES variants' "
                     "collectives (split fit), scored on the baseline model's (split score)")
    return BenchResult(name="dispatch", params=params, rows=rows, ratios=ratios, env=collect_env(),
                       notes=notes)
