"""Train the MoE-VLM with expert parallelism:

    torchrun --standalone --nproc-per-node=2 -m epruntime.train --config launch/configs/tiny-vqa.yaml

Resumes from the newest complete checkpoint under `<train.output_dir>/checkpoints` (train.resume=
true); never trains over an existing checkpoint (see epruntime.checkpoint.prepare_run).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from epruntime import faults
from epruntime.cli import config_parser, run
from epruntime.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    args = config_parser("epruntime.train", __doc__.split("\n\n")[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    fault = faults.from_env()  # EPRUNTIME_FAULT; checked before any process group exists
    # torch and megatron-core load only for a config that can run: a bad one fails in a second.
    from epruntime import distributed

    env = distributed.init_distributed(cfg)
    try:
        return _train(cfg, env, fault)
    finally:
        distributed.shutdown()


def _train(cfg, env, fault: faults.Fault | None = None) -> int:
    from epruntime import checkpoint, traces
    from epruntime.data import ShardedBatchIterator
    from epruntime.data.jsonl import DataVocab
    from epruntime.datasets import build_datasets
    from epruntime.engine import Engine
    from epruntime.metrics import metrics_for
    from epruntime.placement.controller import PlacementController
    from epruntime.summary import report

    t0 = time.perf_counter()
    # Before any model is built: output_dir writable on every rank, resume point decided (or a
    # named refusal), leftovers of an interrupted save removed.
    resume_from = checkpoint.prepare_run(cfg)
    if resume_from is not None and checkpoint.read_meta(resume_from)["step"] == cfg.train.max_steps:
        if env.is_main:  # a finished run started again (e.g. the README command twice)
            print(f"epruntime.train: nothing to train: {resume_from} is at train.max_steps="
                  f"{cfg.train.max_steps}; {cfg.train.output_dir}/summary.json is left as it is "
                  "(raise train.max_steps to train further)", file=sys.stderr, flush=True)
        return 0
    train_ds, eval_ds = build_datasets(cfg)
    if len(train_ds) < cfg.data.global_batch_size:
        raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} exceeds the "
                          f"{len(train_ds)} training items (data.max_train_items="
                          f"{cfg.data.max_train_items}); lower the batch or use more items")
    engine = Engine(cfg, env, len(train_ds.vocab), train_ds.num_answers, train_ds.max_question_len)
    # The words and answers the model's ids mean travel with every checkpoint (epruntime.infer
    # --data and epruntime.predict encode new questions with them).
    vocab_meta = {"data_vocab": DataVocab.of_dataset(train_ds).to_dict()}
    mx = metrics_for(cfg, engine)  # Prometheus /metrics; no-op unless metrics.enabled
    batches = ShardedBatchIterator(train_ds, cfg.data.global_batch_size, env.dp_rank, env.dp_size,
                                   seed=cfg.train.seed)
    step = 0
    if resume_from is not None:
        meta = checkpoint.load_checkpoint(engine, resume_from)
        try:
            batches.load_state_dict(meta["data"])
        except (KeyError, TypeError, ValueError) as err:
            raise checkpoint.CheckpointError(
                f"{resume_from}: its data position does not fit this run ({err}); resume with the "
                "checkpoint's data settings (meta.json config.data), or start over with "
                "train.resume=false train.overwrite=true, or choose another train.output_dir"
            ) from None
        step = meta["step"]

    # Saves, synchronous or in the background (train.async_checkpoint); one in flight at a time.
    saver = checkpoint.Checkpointer(
        engine, cfg.train.async_checkpoint,
        after_write=(lambda at: fault.in_save(env.rank, at)) if fault is not None else None)
    placement = PlacementController(engine)  # re-binning and expert migration between steps
    if resume_from is None:  # a resumed run keeps the checkpoint's placement
        placement.start()  # dispatch.placement=file:PATH moves the experts there
    recorder = traces.start_recording(cfg, engine, env)  # None unless trace.enabled
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not (env.is_main and cfg.train.progress),
               desc="train", unit="step", dynamic_ncols=True)
    losses: list[float] = []
    result = None
    tokens, train_seconds = 0, 0.0
    migrations = {"count": 0, "bytes_sent": 0, "seconds": 0.0}
    skipped = 0  # steps without an update (non-finite loss or grad norm), train.skip_nonfinite_steps
    while step < cfg.train.max_steps:
        batch = next(batches).to(env.device)
        if fault is not None:
            fault.maybe_fire(env.rank, step, batch)
        t = time.perf_counter()
        result = engine.train_step(batch, step,
                                   may_skip=skipped < cfg.train.skip_nonfinite_steps)
        dt = time.perf_counter() - t
        train_seconds += dt
        mx.on_step(step, result, dt)
        tokens += result.tokens * env.world_size
        if result.skipped:
            skipped += 1
            if env.is_main:
                bar.write(f"epruntime: warning: step {step}: non-finite loss ({result.loss}) or "
                          f"gradient norm ({result.grad_norm}); skipped ({skipped} of "
                          f"train.skip_nonfinite_steps={cfg.train.skip_nonfinite_steps})",
                          file=sys.stderr)
        else:
            losses.append(result.loss)
        step += 1
        if not result.skipped and (migration := placement.after_step(step - 1)) is not None:
            migrations["count"] += 1  # SMoES re-binned and experts moved to their bins
            migrations["bytes_sent"] += migration["bytes_sent"]
            migrations["seconds"] += migration["seconds"]
            mx.on_migration(migration)
        if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens / max(train_seconds, 1e-9):,.0f}",
                            lr=f"{result.lr:.2e}",
                            **{k.removesuffix("_loss"): f"{v:.3g}" for k, v in result.aux_losses.items()})
        bar.update(1)
        if step % cfg.train.checkpoint_interval == 0 or step == cfg.train.max_steps:
            saver.save(step, batches.state_dict(), vocab_meta)
            mx.on_checkpoint()
    saver.wait()  # the last save is durable (or its failure raised) before the summary
    bar.close()
    traces.finish_recording(recorder, cfg, env, cfg.train.output_dir)  # training steps only

    summary = {"steps": step, "final_loss": losses[-1] if losses else None,
               "world_size": env.world_size, "ep_size": env.ep_size,
               "tokens_per_s": tokens / train_seconds if train_seconds else None,
               "resumed_from_step": meta["step"] if resume_from is not None else None,
               "skipped_steps": skipped,
               "aux_losses": result.aux_losses if result is not None else {},
               "majority_baseline": eval_ds.majority_baseline() if eval_ds is not None else None,
               "comm": engine.comm_summary(),
               "comm_time": engine.comm_time_summary(),  # None unless dispatch.timing
               "migrations": migrations,  # this rank's; bins placement moves experts on rebin
               "placements": [p.to_dict() for p in engine.model.placements]}
    if cfg.train.eval_at_end:
        metrics = engine.evaluate(eval_ds)
        mx.on_eval(metrics)
        metrics["eval_comm"] = metrics.pop("comm")
        metrics["eval_comm_time"] = metrics.pop("comm_time")
        summary.update(metrics)
    summary["seconds"] = time.perf_counter() - t0
    report(env.is_main, cfg.train.output_dir, summary)
    mx.close()
    return 0


if __name__ == "__main__":
    run(main, "epruntime.train")
