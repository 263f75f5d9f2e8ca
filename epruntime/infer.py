"""Evaluate a checkpoint, or predict on your own data, with expert parallelism:

    torchrun --standalone --nproc-per-node=2 -m epruntime.infer --checkpoint runs/tiny-vqa
    torchrun --standalone --nproc-per-node=2 -m epruntime.infer --checkpoint runs/scenes \
        --data my_questions.jsonl [--image-root DIR]

Without --config the checkpoint's own config is used (with any --set overrides), so the model
always matches; the EP size may differ from the one it was trained with. With --data, every line
of the JSONL file ({"image", "question"[, "answer"][, "id"]}, epruntime.data.jsonl) gets one line
of `<infer.output_dir>/predictions.jsonl` in input order (id, answer, probability, and the
reference answer when the line has one), and summary.json reports the accuracy over the lines
that have answers. Questions and answers use the checkpoint's vocabulary (meta.json extra.data_vocab).
"""

from __future__ import annotations

import time
from pathlib import Path

from epruntime import checkpoint, distributed, traces
from epruntime.cli import config_parser, run
from epruntime.config import ConfigError
from epruntime.data.jsonl import load_jsonl
from epruntime.metrics import metrics_for
from epruntime.predict import (build_engine, checkpoint_vocab, load_inference_config,
                               predict_dataset, prediction_lines, write_predictions)
from epruntime.summary import report


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("epruntime.infer", __doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint step directory, or a training output_dir (-> latest)")
    parser.add_argument("--data", type=Path,
                        help="JSONL file to predict on (writes predictions.jsonl); default: "
                             "evaluate the config's evaluation split")
    parser.add_argument("--image-root", type=Path,
                        help="folder the --data image paths are relative to (default: the "
                             "JSONL file's folder)")
    args = parser.parse_args(argv)
    if args.image_root is not None and args.data is None:
        parser.error("--image-root needs --data")
    path = checkpoint.resolve_checkpoint(args.checkpoint)
    cfg, meta = load_inference_config(path, args.config, args.overrides)
    vocab = checkpoint_vocab(meta, cfg)
    dataset = None
    if args.data is not None:  # read and check the whole file before any process group exists
        dataset = load_jsonl(args.data, vocab, cfg.model.image_size, image_root=args.image_root,
                             need_answers=False, field="--data")
    env = distributed.init_distributed(cfg)
    try:
        if dataset is None:
            return _evaluate(cfg, env, path, vocab)
        return _predict(cfg, env, path, vocab, dataset)
    finally:
        distributed.shutdown()


def _evaluate(cfg, env, path, vocab) -> int:
    from epruntime.datasets import build_datasets

    t0 = time.perf_counter()
    _, eval_ds = build_datasets(cfg)
    if eval_ds is None:
        raise ConfigError("nothing to evaluate: the config names no evaluation split "
                          "(data.eval_jsonl); pass --data FILE.jsonl or set data.eval_jsonl")
    engine, meta = build_engine(cfg, env, vocab, path)
    mx = metrics_for(cfg, engine)  # Prometheus /metrics; no-op unless metrics.enabled
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


def _predict(cfg, env, path, vocab, dataset) -> int:
    t0 = time.perf_counter()
    engine, meta = build_engine(cfg, env, vocab, path)
    mx = metrics_for(cfg, engine)
    recorder = traces.start_recording(cfg, engine, env)
    t = time.perf_counter()
    labels, probs, figures = predict_dataset(engine, dataset)
    seconds = time.perf_counter() - t
    traces.finish_recording(recorder, cfg, env, cfg.infer.output_dir)
    out = Path(cfg.infer.output_dir) / "predictions.jsonl"
    if env.is_main:
        write_predictions(out, prediction_lines(dataset, labels, probs))
    summary = {**figures, "steps": meta["step"], "checkpoint": str(path),
               "data": str(dataset.path), "predictions": str(out),
               "tokens_per_s": len(dataset) * engine.model.seq_len / seconds,
               "world_size": env.world_size, "ep_size": env.ep_size,
               "seconds": time.perf_counter() - t0}
    if "eval_accuracy" in figures:
        mx.on_eval({**figures, "eval_items": figures["answered_items"]},
                   summary["tokens_per_s"] / env.world_size)
    report(env.is_main, cfg.infer.output_dir, summary)
    mx.close()
    return 0


if __name__ == "__main__":
    run(main, "epruntime.infer")
