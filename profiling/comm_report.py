"""Where the all-to-all bytes go: plots, an HTML page and JSON from the CommLedger of runs.

    python profiling/comm_report.py RUN_DIR [--baseline RUN_DIR] --out REPORT_DIR
    python profiling/comm_report.py --run [--set k=v ...] [--epruntime-set k=v ...] --out REPORT_DIR

The first form reads `summary.json` of finished train/infer runs. The second trains a short
baseline (megatron-core's alltoall dispatcher) and an epruntime run (dedup dispatcher) on the
same config, seed and data, one after the other under torchrun, then reports both.

REPORT_DIR gets PNGs (rank x rank byte heatmaps per layer and in total, per-layer bars,
baseline vs epruntime, expert x modality counts, load per rank), `report.html` (self-contained:
PNGs inlined as data URIs, no external resources) and `report.json`. Every number in
report.json and in the HTML tables is copied from the ledger in summary.json, never recomputed,
so the report cannot drift from what the run measured.
"""

from __future__ import annotations

import argparse
import base64
import copy
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "launch/configs/tiny-vqa.yaml"
# A short run that still routes every layer: enough steps for the ledger to be representative.
RUN_DEFAULTS = {"train.max_steps": "20", "train.checkpoint_interval": "20",
                "train.progress": "false", "data.max_train_items": "2048",
                "data.max_eval_items": "256", "data.global_batch_size": "32"}
# Ledgers a summary.json can hold: training forwards and train's evaluation (infer: `comm`).
LEDGERS = ("comm", "eval_comm")
# The phase timer's figures beside them (dispatch.timing=on|barrier; absent or null when off).
TIMINGS = ("comm_time", "eval_comm_time")
TIME_PARTS = ("layout", "wait", "permute", "collective", "combine")
TABLE_COLUMNS = ("cross_rank_bytes", "intra_node_bytes", "inter_node_bytes", "local_bytes",
                 "control_bytes", "payload_bytes", "meta_bytes", "dispatch_cross_rank_bytes",
                 "combine_cross_rank_bytes", "rows_sent", "inter_node_rows", "expert_rows",
                 "floor_rows", "rows_over_floor", "rows_over_expert_rows",
                 "dispatch_text_cross_rank_rows", "dispatch_vision_cross_rank_rows",
                 "combine_text_cross_rank_rows", "combine_vision_cross_rank_rows",
                 "load_per_rank", "balancedness")
DPI = 100


# ---- units ----------------------------------------------------------------------------------
def byte_unit(max_bytes: float) -> tuple[str, float]:
    """The unit a byte axis is drawn in: MiB from 1 MiB up, else KiB, else bytes."""
    if max_bytes >= 2**20:
        return "MiB", float(2**20)
    if max_bytes >= 2**10:
        return "KiB", float(2**10)
    return "B", 1.0


def human_bytes(n: float) -> str:
    unit, scale = byte_unit(abs(n))
    return f"{n / scale:.3g} {unit}" if unit != "B" else f"{int(n)} B"


def short_count(n: float) -> str:
    if abs(n) >= 1e6:
        return f"{n / 1e6:.3g}M"
    if abs(n) >= 1e4:
        return f"{n / 1e3:.3g}k"
    return f"{int(n)}"


# ---- figures (each returns a Figure so tests can inspect titles and labels) -----------------
def _annotate_cells(ax, values: np.ndarray, labels: list[list[str]], fontsize: float = 9) -> None:
    """Cell labels in black or white, whichever reads on the cell's colour."""
    hi = values.max() if values.size and values.max() > 0 else 1
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=fontsize,
                color="white" if v > 0.6 * hi else "black")


def bytes_heatmap(matrix: list[list[int]], title: str) -> Figure:
    """[src][dst] bytes of one ledger, scaled to KiB/MiB, every cell annotated."""
    m = np.asarray(matrix, dtype=np.float64)
    unit, scale = byte_unit(m.max() if m.size else 0)
    R = m.shape[0]
    size = max(3.6, 0.9 * R + 2.2)
    fig = Figure(figsize=(size + 1.0, size), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(m / scale, cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax, label=f"bytes sent ({unit})")
    _annotate_cells(ax, m, [[human_bytes(v) for v in row] for row in m],
                    fontsize=max(5, 10 - R // 2))
    ax.set_xticks(range(R))
    ax.set_yticks(range(R))
    ax.set_xlabel("destination EP rank")
    ax.set_ylabel("source EP rank")
    ax.set_title(f"{title}\n(diagonal: local, not on the wire; unit {unit})", fontsize=10)
    fig.tight_layout()
    return fig


def per_layer_bars(runs: dict[str, dict]) -> Figure:
    """Cross-rank bytes per layer, dispatch and combine stacked, one bar per run."""
    names = list(runs)
    L = max(len(r["comm"]["per_layer"]) for r in runs.values())
    peak = max(p["cross_rank_bytes"] for r in runs.values() for p in r["comm"]["per_layer"])
    unit, scale = byte_unit(peak)
    fig = Figure(figsize=(max(5.0, 1.2 * L * len(names) + 2), 4.2), dpi=DPI)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(L)
    for i, name in enumerate(names):
        layers = runs[name]["comm"]["per_layer"]
        disp = np.array([p["dispatch_cross_rank_bytes"] for p in layers]) / scale
        comb = np.array([p["combine_cross_rank_bytes"] for p in layers]) / scale
        pos = x[: len(layers)] + (i - (len(names) - 1) / 2) * width
        ax.bar(pos, disp, width, label=f"{name}: dispatch", color=f"C{2 * i}")
        ax.bar(pos, comb, width, bottom=disp, label=f"{name}: combine", color=f"C{2 * i + 1}")
        for xp, p in zip(pos, layers):
            ax.text(xp, p["cross_rank_bytes"] / scale, human_bytes(p["cross_rank_bytes"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"layer {i + 1}" for i in range(L)])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(f"cross-rank bytes ({unit})")
    ax.set_title("Cross-rank all-to-all bytes per layer (forward passes, ledger 'comm')")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison(runs: dict[str, dict]) -> Figure:
    """Runs side by side: cross-rank bytes (payload/meta/control), rows vs their floor."""
    names = list(runs)
    comm = [runs[n]["comm"] for n in names]
    fig = Figure(figsize=(11, 4.2), dpi=DPI)
    ax_b, ax_r = fig.subplots(1, 2)

    # payload + meta stack to cross_rank_bytes exactly; the (tiny) control bytes are in the table.
    unit, scale = byte_unit(max(c["cross_rank_bytes"] for c in comm))
    bottom = np.zeros(len(names))
    for key, color in (("payload_bytes", "C0"), ("meta_bytes", "C1")):
        v = np.array([c[key] for c in comm], dtype=np.float64) / scale
        ax_b.bar(names, v, bottom=bottom, label=key.replace("_", " "), color=color)
        bottom += v
    for i, c in enumerate(comm):
        ax_b.text(i, c["cross_rank_bytes"] / scale, human_bytes(c["cross_rank_bytes"]),
                  ha="center", va="bottom", fontsize=9)
    ax_b.set_ylabel(f"cross-rank bytes ({unit})")
    ax_b.set_xlabel("run")
    ax_b.set_title("Cross-rank bytes, all layers (forward)")
    ax_b.margins(y=0.15)
    ax_b.legend(fontsize=8)

    keys = ("rows_sent", "expert_rows", "floor_rows")
    width = 0.8 / len(keys)
    x = np.arange(len(names))
    for k, key in enumerate(keys):
        v = [c[key] for c in comm]
        pos = x + (k - 1) * width
        ax_r.bar(pos, v, width, label=key.replace("_", " "), color=f"C{k + 3}")
        for xp, val in zip(pos, v):
            ax_r.text(xp, val, short_count(val), ha="center", va="bottom", fontsize=8)
    ax_r.set_xticks(x, names)
    ax_r.set_xlabel("run")
    ax_r.set_ylabel("cross-rank dispatch rows (count)")
    ax_r.set_title("Rows sent vs per-expert rows and the dedup floor")
    ax_r.margins(y=0.15)
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    return fig


def phase_time_bars(runs: dict[str, dict]) -> Figure:
    """Seconds of the slowest rank in each (direction, phase), parts stacked, one bar per run."""
    names = [n for n in runs if runs[n].get("comm_time")]
    groups = [(d, p) for d in ("forward", "backward") for p in ("dispatch", "combine")]
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * len(names) + 2), 4.2), dpi=DPI)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        parts = runs[name]["comm_time"]["parts"]
        pos = x + (i - (len(names) - 1) / 2) * width
        bottom = np.zeros(len(groups))
        for k, part in enumerate(TIME_PARTS):
            v = np.array([parts[d][p][part] for d, p in groups]) * 1e3
            ax.bar(pos, v, width, bottom=bottom, color=f"C{k}", edgecolor="white", linewidth=0.5,
                   label=part if i == 0 else None)
            bottom += v
        for xp, (d, p) in zip(pos, groups):
            ax.text(xp, parts[d][p]["total"] * 1e3, name, ha="center", va="bottom", fontsize=7,
                    rotation=90)
    ax.set_xticks(x, [f"{d}\n{p}" for d, p in groups])
    ax.set_xlabel("direction and phase")
    ax.set_ylabel("seconds of the slowest rank (ms), all layers")
    ax.set_title("All-to-all phase time by part (comm_time)")
    ax.margins(y=0.3)
    ax.legend(fontsize=8, title="part")
    fig.tight_layout()
    return fig


def expert_modality_heatmap(routing_per_layer: list[dict], title: str) -> Figure:
    """[modality][expert] routed (token, expert) pairs, one row of panels per layer."""
    L = len(routing_per_layer)
    E = len(routing_per_layer[0]["expert_modality_counts"][0])
    fig = Figure(figsize=(max(6.0, 0.42 * E + 2), 1.9 * L + 0.9), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(L, 1, squeeze=False)[:, 0])
    for ax, layer in zip(axes, routing_per_layer):
        counts = np.asarray(layer["expert_modality_counts"], dtype=np.float64)
        im = ax.imshow(counts, cmap="magma_r", aspect="auto", vmin=0)
        fig.colorbar(im, ax=ax, label="(token, expert) pairs", pad=0.01)
        _annotate_cells(ax, counts, [[short_count(v) for v in row] for row in counts],
                        fontsize=6 if E > 16 else 8)
        ax.set_yticks([0, 1], ["text", "vision"])
        ax.set_xticks(range(E))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("token modality")
        ax.set_xlabel("expert (logical id)")
        ax.set_title(f"{title}: layer {layer['layer']} (routed (token, expert) pairs, count)",
                     fontsize=10)
    fig.tight_layout()
    return fig


def load_per_rank(runs: dict[str, dict]) -> Figure:
    """(token, expert) pairs computed by each rank's experts, with balancedness (mean/max)."""
    names = list(runs)
    R = max(len(r["comm"]["load_per_rank"]) for r in runs.values())
    fig = Figure(figsize=(max(5.0, 0.9 * R * len(names) + 2), 4.0), dpi=DPI)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        c = runs[name]["comm"]
        pos = np.arange(len(c["load_per_rank"])) + (i - (len(names) - 1) / 2) * width
        ax.bar(pos, c["load_per_rank"], width, color=f"C{i}",
               label=f"{name} (balancedness {c['balancedness']:.3f})")
        for xp, v in zip(pos, c["load_per_rank"]):
            ax.text(xp, v, short_count(v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(R), [f"rank {r}" for r in range(R)])
    ax.set_xlabel("EP rank")
    ax.set_ylabel("expert load: (token, expert) pairs (count)")
    ax.set_title("Expert load per rank, all layers (ledger 'comm')")
    ax.margins(y=0.3)  # headroom for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncols=len(names))
    fig.tight_layout()
    return fig


# ---- the report ---------------------------------------------------------------------------
def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise SystemExit(f"comm_report: no summary.json in {run_dir}")
    summary = json.loads(path.read_text())
    if not summary.get("comm"):
        raise SystemExit(f"comm_report: {path} has no comm ledger (dispatch.ledger off?)")
    return summary


def run_record(run_dir: Path, summary: dict) -> dict:
    """What report.json keeps of a run: its ledgers and routing, verbatim."""
    rec = {"run_dir": str(Path(run_dir).resolve()), "steps": summary.get("steps"),
           "ep_size": summary.get("ep_size"), "world_size": summary.get("world_size")}
    for key in LEDGERS + TIMINGS:
        if summary.get(key):
            rec[key] = copy.deepcopy(summary[key])
    if summary.get("routing_per_layer"):
        rec["routing_per_layer"] = copy.deepcopy(summary["routing_per_layer"])
    return rec


def _fname(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)  # run labels are free text; file names are not


def figures(runs: dict[str, dict]) -> list[tuple[str, str, Figure]]:
    """(file name, caption, figure) of every plot for these runs."""
    out = []
    if len(runs) > 1:
        out.append(("comparison.png", "Baseline vs epruntime: bytes, rows and the floor",
                    comparison(runs)))
    out.append(("per_layer_bytes.png", "Cross-rank bytes per layer", per_layer_bars(runs)))
    out.append(("load_per_rank.png", "Expert load per rank", load_per_rank(runs)))
    if any(rec.get("comm_time") for rec in runs.values()):
        out.append(("phase_time.png", "All-to-all phase time by part (slowest rank)",
                    phase_time_bars(runs)))
    for name, rec in runs.items():
        comm = rec["comm"]
        out.append((f"{_fname(name)}_bytes_total.png",
                    f"{name}: bytes per (source, destination) rank, all layers",
                    bytes_heatmap(comm["bytes_matrix"], f"{name}: all-to-all bytes, all layers")))
        for i, layer in enumerate(comm["per_layer"]):
            out.append((f"{_fname(name)}_bytes_layer{i + 1}.png",
                        f"{name}: bytes per (source, destination) rank, layer {i + 1}",
                        bytes_heatmap(layer["bytes_matrix"],
                                      f"{name}: all-to-all bytes, layer {i + 1}")))
    for name, rec in runs.items():
        routing = rec.get("routing_per_layer") or []
        if routing and all("expert_modality_counts" in p for p in routing):
            out.append((f"{_fname(name)}_expert_modality.png",
                        f"{name}: routed (token, expert) pairs by modality (evaluation)",
                        expert_modality_heatmap(routing, f"{name}: expert x modality")))
    return out


def _cell(v) -> str:
    # repr of a float round-trips exactly; ints print as they are.
    return "" if v is None else html.escape(repr(v) if isinstance(v, float) else str(v))


def _table(rows: list[tuple[str, dict]], columns, css_class: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("", *columns))
    body = "".join(
        f"<tr><th>{html.escape(label)}</th>"
        + "".join(f'<td data-key="{c}">{_cell(fig.get(c))}</td>' for c in columns) + "</tr>"
        for label, fig in rows)
    # Wide tables scroll inside their box instead of widening the page.
    return (f'<div class="scroll"><table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


def render_html(report: dict, images: list[tuple[str, str, bytes]]) -> str:
    runs = report["runs"]
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>epruntime comm report</title><style>",
             "body{font-family:sans-serif;margin:1.5em;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:12px}"
             "th,td{border:1px solid #bbb;padding:2px 6px;text-align:right;white-space:nowrap}"
             ".scroll{overflow-x:auto;max-width:100%}"
             "thead th{background:#eee}figure{display:inline-block;margin:0 1em 1em 0}"
             "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px}",
             "</style></head><body><h1>All-to-all communication report</h1>",
             "<p>Exact bytes and rows from the CommLedger (forward dispatch + combine; the "
             "backward all-to-alls mirror them). Bytes are payload + metadata; the diagonal of "
             "the rank matrices is local and never on the wire.</p>"]
    for key, title in (("comm", "comm: training forwards (infer: its evaluation)"),
                       ("eval_comm", "Evaluation (eval_comm)")):
        have = [(n, r[key]) for n, r in runs.items() if key in r]
        if not have:
            continue
        parts.append(f"<h2>{html.escape(title)}: totals</h2>")
        parts.append(_table(have, TABLE_COLUMNS, f"totals {key}"))
        for name, ledger in have:
            parts.append(f"<h3>{html.escape(name)}: per layer ({html.escape(key)})</h3>")
            parts.append(_table([(f"layer {i + 1}", p) for i, p in enumerate(ledger["per_layer"])],
                                TABLE_COLUMNS, f"per-layer {key} run-{name}"))
    for key in TIMINGS:
        have = [(n, r[key]) for n, r in runs.items() if r.get(key)]
        if not have:
            continue
        parts.append(f"<h2>{html.escape(key)}: seconds by phase and part (slowest rank)</h2>")
        parts.append("<p>Wall time of the dispatch and combine phases (dispatch.timing): "
                     "seconds beside the bytes above. wait = for the slowest peer.</p>")
        rows = []
        for name, t in have:
            rows.append((f"{name} (all)", {"seconds": t["seconds"],
                                           "forward_seconds": t["forward_seconds"],
                                           "backward_seconds": t["backward_seconds"],
                                           "clock": t["clock"], "wait": t["wait"]}))
        parts.append(_table(rows, ("seconds", "forward_seconds", "backward_seconds", "clock",
                                   "wait"), f"time-totals {key}"))
        rows = [(f"{name} {d} {p}", t["parts"][d][p]) for name, t in have
                for d in ("forward", "backward") for p in ("dispatch", "combine")]
        parts.append(_table(rows, (*TIME_PARTS, "total"), f"time-parts {key}"))
    parts.append("<h2>Plots</h2>")
    for fname, caption, png in images:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' data-file='{fname}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)} "
                     f"({html.escape(fname)})</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(runs_in: dict[str, Path], out: Path) -> dict:
    """runs_in: display name -> run dir (baseline first when there is one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: run_record(d, load_run(d)) for name, d in runs_in.items()}
    images = []
    for fname, caption, fig in figures(runs):
        fig.savefig(out / fname, dpi=DPI)
        images.append((fname, caption, (out / fname).read_bytes()))
        plt.close(fig)
    report = {"runs": runs, "plots": [{"file": f, "caption": c} for f, c, _ in images]}
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / "report.html").write_text(render_html(report, images))
    return report


# ---- running the pair ------------------------------------------------------------------------
def train_pair(out: Path, config: Path, nproc: int, common: list[str], epruntime: list[str],
               kind: str) -> dict[str, Path]:
    """Baseline (alltoall) then epruntime (`kind`) training, same config, seed and data."""
    overrides = {**RUN_DEFAULTS, **dict(kv.split("=", 1) for kv in common)}
    runs = {}
    for name, dispatch, extra in (("baseline", "alltoall", []), ("epruntime", kind, epruntime)):
        run_dir = out / "runs" / name
        fields = {**overrides, "dispatch.kind": dispatch, **dict(kv.split("=", 1) for kv in extra),
                  "train.output_dir": str(run_dir), "train.resume": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "epruntime.train", "--config", str(config)]
        for k, v in fields.items():
            cmd += ["--set", f"{k}={v}"]
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        env.setdefault("OMP_NUM_THREADS", "1")
        print(f"comm_report: training {name} (dispatch.kind={dispatch}) -> {run_dir}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"comm_report: {name} training failed (exit {proc.returncode})")
        runs[name] = run_dir
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comm_report.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:5]))
    p.add_argument("run_dir", nargs="?", type=Path, help="a finished run (with summary.json)")
    p.add_argument("--baseline", type=Path, help="a baseline run to compare against")
    p.add_argument("--label", default="epruntime",
                   help="name of RUN_DIR in the report (default epruntime; the baseline is "
                        "'baseline')")
    p.add_argument("--out", type=Path, required=True, help="report directory (created)")
    p.add_argument("--run", action="store_true",
                   help="train a baseline (alltoall) and an epruntime run first")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config for --run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                   help="config override for both --run trainings (repeatable)")
    p.add_argument("--epruntime-set", action="append", default=[], metavar="K=V",
                   help="config override for the epruntime training only (repeatable)")
    p.add_argument("--kind", default="dedup", choices=("dedup", "dedup-hier"),
                   help="epruntime's dispatcher for --run (default dedup)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per --run training (default 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for kv in args.sets + args.epruntime_set:
        if "=" not in kv:
            parser.error(f"--set expects K=V, got {kv!r}")
    if args.run:
        if args.run_dir or args.baseline:
            parser.error("--run trains its own runs; give no RUN_DIR or --baseline")
        runs = train_pair(args.out, args.config, args.nproc, args.sets, args.epruntime_set,
                          args.kind)
    elif args.run_dir:
        if args.label == "baseline" and args.baseline:
            parser.error("--label baseline clashes with --baseline")
        runs = ({"baseline": args.baseline} if args.baseline else {}) | {args.label: args.run_dir}
    else:
        parser.error("give RUN_DIR or --run")
    report = write_report(runs, args.out)
    for name, rec in report["runs"].items():
        c = rec["comm"]
        print(f"{name}: cross_rank_bytes={c['cross_rank_bytes']} rows_sent={c['rows_sent']} "
              f"floor_rows={c['floor_rows']} balancedness={c['balancedness']:.4f}")
    print(f"comm_report: {len(report['plots'])} plots, report.html, report.json -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
