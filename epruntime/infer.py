"""Evaluate a checkpoint with expert parallelism:

    torchrun --standalone --nproc-per-node=2 -m epruntime.infer --checkpoint runs/tiny-vqa

Without --config the checkpoint's own config is used (with any --set overrides), so the model
always matches; the EP size may differ from the one it was trained with.
"""

from __future__ import annotations

import time

from epruntime import checkpoint, distributed, traces
from epruntime.cli import config_parser, run
from epruntime.config import apply_overrides, config_from_dict, load_config
from epruntime.datasets import build_datasets
from epruntime.engine import Engine
from epruntime.metrics import metrics_for
from epruntime.summary import report


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("epruntime.infer", __doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint step directory, or a training output_dir (-> latest)")
    args = parser.parse_args(argv)
    path = checkpoint.resolve_checkpoint(args.checkpoint)
    meta = checkpoint.read_meta(path)
    checkpoint.check_format(meta, path)  # another format version: named before any process group
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = config_from_dict(apply_overrides(meta["config"], args.overrides))
    checkpoint.check_compatible(meta, cfg, path)
    env = distributed.init_distributed(cfg)
    try:
        return _infer(cfg, env, path)
    finally:
        distributed.shutdown()


def _infer(cfg, env, path) -> int:
    t0 = time.perf_counter()
    train_ds, eval_ds = build_datasets(cfg)
    engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers, train_ds.max_question_len)
    mx = metrics_for(cfg, engine)  # Prometheus /metrics; no-op unless metrics.enabled
    meta = checkpoint.load_checkpoint(engine, path, restore_training_state=False)
    recorder = traces.start_recording(cfg, engine, env)  # None unless trace.enabled
    t = time.perf_counter()
    metrics = engine.evaluate(eval_ds)
    eval_seconds = time.perf_counter() - t
    traces.finish_recording(recorder, cfg, env, cfg.infer.output_dir)
    summary = {**metrics, "steps": meta["step"], "checkpoint": str(path),
               "majority_baseline": eval_ds.majority_baseline(),
               "tokens_per_s": metrics["eval_items"] * engine.model.seq_len / eval_seconds,
               "world_size": env.world_size, "ep_size": env.ep_size,
               "seconds": time.perf_counter() - t0}
    mx.on_eval(metrics, summary["tokens_per_s"] / env.world_size)  # this rank's share
    report(env.is_main, cfg.infer.output_dir, summary)
    mx.close()
    return 0


if __name__ == "__main__":
    run(main, "epruntime.infer")
