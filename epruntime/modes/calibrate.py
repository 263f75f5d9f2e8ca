"""Calibrate MoDES for a checkpoint: alpha per (layer, modality) and the two thresholds, from a
seeded sample of TRAINING questions (the test split is left for judging), then save the JSON
that inference reads (`modes.calibration`):

    torchrun --standalone --nproc-per-node=2 -m epruntime.modes.calibrate \
        --checkpoint runs/tiny-vqa --out runs/tiny-vqa/modes.json [--set modes.kl_bound=0.01]
    torchrun --standalone --nproc-per-node=2 -m epruntime.infer --checkpoint runs/tiny-vqa \
        --set modes.enabled=true --set modes.calibration=runs/tiny-vqa/modes.json

Steps (all collective; every rank holds its share of the samples, as evaluation shards them):
1. Reference: the full model's answer distribution p for every calibration sample.
2. alpha (globally-modulated local gating): for every layer l and modality m, the layer's experts
   are removed for the tokens of m (no pair of theirs dispatched: they keep only the residual
   stream through that MoE layer) and D[l, m] = mean KL(p || p_removed) is measured;
   alpha[l, m] = D[l, m] / sum_l' D[l', m]. This is our reading of MoDES (arXiv 2511.15690):
   the paper derives the global importance from the output change when a layer's experts are
   skipped for one modality, a KL on calibration samples normalised over the layers (its public
   calibration script does the same normalisation); assumed: removal means a zero expert output
   for those tokens, and a modality whose removals change nothing gets alpha = 1 / L.
3. Thresholds (dual-modality thresholding): a grid per modality from 0 to the modality's largest
   score seen (quadratic spacing), searched along the frontier (epruntime.modes.search) for the
   highest skip ratio whose mean KL(p || p_skipped) stays within `modes.kl_bound`. The paper
   searches the other way round (lowest KL at a target skip ratio); `search_skip_target` does
   that, and the benchmark uses it for its other skip ratios.
The sample rows are the first `modes.calibration_samples` of a permutation seeded by
`modes.calibration_seed`; reductions are float64 in a fixed order, so a seed gives one result.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from epruntime.config import ConfigError, ModesConfig
from epruntime.distributed import host_all_reduce
from epruntime.modality import TEXT, VISION
from epruntime.modes.calibration import (CalibratedModel, Calibration, check_fingerprint,
                                         load_calibration, weights_fingerprint)
from epruntime.modes.search import (SearchResult, max_skip_within_kl, min_kl_at_skip,
                                    threshold_grid)
from epruntime.modes.skip import skip_ratio


def calibration_rows(num_train: int, samples: int, seed: int) -> torch.Tensor:
    """[samples] int64 ascending: the training rows calibration uses (seeded)."""
    if samples > num_train:
        raise ConfigError(f"modes.calibration_samples={samples} exceeds the {num_train} "
                          "training questions")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[:samples].sort().values


class Calibrator:
    """The calibration samples of this rank, the full model's answers on them, and measurements
    of the model under a MoDES configuration (every method is collective over the world)."""

    def __init__(self, engine, train_dataset, cfg: ModesConfig, batch_size: int | None = None):
        self.engine, self.cfg = engine, cfg
        self.model = engine.model
        self.skipper = self.model.skipper
        env = engine.env
        self.rows = calibration_rows(len(train_dataset), cfg.calibration_samples,
                                     cfg.calibration_seed)
        n, dp, rank = len(self.rows), env.dp_size, env.dp_rank
        batch_size = batch_size or max(1, engine.cfg.data.eval_batch_size // dp)
        self.batches = []  # this rank's (batch, valid [B]); padded with row 0, not counted
        for start in range(0, n, dp * batch_size):
            idx = torch.arange(start + rank * batch_size, start + (rank + 1) * batch_size)
            valid = idx < n
            rows = self.rows[torch.where(valid, idx, 0)]
            self.batches.append((train_dataset.batch(rows).to(env.device), valid.to(env.device)))
        self.previous = (self.skipper.enabled, self.skipper.alpha_L2, self.skipper.thresholds)
        # 1. the reference, through the skipper at thresholds 0 (nothing skipped, bit-identical
        # to the full model) so that it records the largest routing weights
        self.skipper.configure(True, None, (0.0, 0.0))
        self.reference, _, _ = self._run(reference=None)
        _, self.max_weight_L2 = self.skipper.totals(dist.group.WORLD)
        self.alpha_L2: torch.Tensor | None = None
        self.layer_kl_L2: torch.Tensor | None = None

    def restore(self) -> None:
        """Put the skipper back as it was before calibration."""
        enabled, alpha, thresholds = self.previous
        self.skipper.configure(enabled, alpha, thresholds)

    @torch.no_grad()
    def _run(self, reference: list[torch.Tensor] | None = ...
             ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        """(log-probabilities [B, A] per batch, mean KL(reference || these) over the samples
        (0 without a reference), pairs [L, {routed, skipped}, 2] over the world) of one pass."""
        reference = self.reference if reference is ... else reference
        model = self.model
        was_training = model.training
        model.eval()
        self.skipper.reset_stats()
        logps, kl_sum = [], torch.zeros((), dtype=torch.float64, device=self.engine.env.device)
        try:
            for b, (batch, valid) in enumerate(self.batches):
                logits = model(batch.images, batch.question_ids, batch.question_lens)
                logp = torch.log_softmax(logits.double(), dim=-1)
                logps.append(logp)
                if reference is not None:
                    ref = reference[b]
                    kl_B = (ref.exp() * (ref - logp)).sum(-1)
                    kl_sum = kl_sum + kl_B[valid].sum()
        finally:
            model.train(was_training)
        kl_sum = kl_sum.cpu().reshape(1)  # host sync: the measurement
        host_all_reduce(kl_sum, group=dist.group.WORLD)
        pairs, _ = self.skipper.totals(dist.group.WORLD)
        return logps, float(kl_sum) / len(self.rows), pairs

    def measure(self, text_threshold: float, vision_threshold: float) -> tuple[float, float]:
        """(mean KL to the full model, skip ratio) at these thresholds, with the fitted alpha."""
        self.skipper.configure(True, self.alpha(), (text_threshold, vision_threshold))
        _, kl, pairs = self._run()
        return kl, skip_ratio(pairs)

    def alpha(self) -> torch.Tensor:
        """[L, 2] float64: each layer's share of the output change its experts make, per
        modality (step 2 of the module docstring); measured once."""
        if self.alpha_L2 is None:
            layers = self.skipper.num_layers
            kl_L2 = torch.zeros(layers, 2, dtype=torch.float64)
            self.skipper.configure(False, None, (0.0, 0.0))
            for layer in range(layers):
                for modality in (TEXT, VISION):
                    with self.skipper.removing(layer, modality):
                        kl_L2[layer, modality] = self._run()[1]
            total_2 = kl_L2.sum(0)
            self.layer_kl_L2 = kl_L2
            self.alpha_L2 = torch.where(total_2 > 0, kl_L2 / total_2.clamp_min(1e-300),
                                        torch.full_like(kl_L2, 1.0 / layers))
        return self.alpha_L2

    def grids(self) -> tuple[list[float], list[float]]:
        """Threshold grids (text, vision): 0 .. the largest score alpha x weight of the modality."""
        top_2 = (self.alpha() * self.max_weight_L2.double()).amax(0).clamp(max=1.0)
        return (threshold_grid(float(top_2[TEXT]), self.cfg.grid_points),
                threshold_grid(float(top_2[VISION]), self.cfg.grid_points))

    def _search(self, how, bound_or_target: float) -> tuple[SearchResult, list, list]:
        text_grid, vision_grid = self.grids()
        result = how(lambda i, j: self.measure(text_grid[i], vision_grid[j]),
                     len(text_grid), len(vision_grid), bound_or_target)
        return result, text_grid, vision_grid

    def search_kl_bound(self, kl_bound: float) -> tuple[SearchResult, list, list]:
        """The highest skip ratio whose KL is within `kl_bound` (this project's form)."""
        return self._search(max_skip_within_kl, kl_bound)

    def search_skip_target(self, target: float) -> tuple[SearchResult, list, list]:
        """The lowest KL at a skip ratio >= `target` (the paper's form)."""
        return self._search(min_kl_at_skip, target)

    def calibration(self, found: tuple[SearchResult, list, list], model: CalibratedModel,
                    **fit) -> Calibration:
        """The calibration file's content for a search result."""
        result, text_grid, vision_grid = found
        if result.i is None:
            raise ConfigError(f"MoDES calibration found no thresholds meeting {fit}")
        tt, tv = text_grid[result.i], vision_grid[result.j]
        self.skipper.configure(True, self.alpha(), (tt, tv))
        _, kl, pairs = self._run()
        routed_2, skipped_2 = pairs.sum(0).double()
        evaluated = [{"text_threshold": text_grid[i], "vision_threshold": vision_grid[j],
                      "kl": kl_, "skip_ratio": s} for (i, j), (kl_, s) in
                     sorted(result.evaluated.items())]
        return Calibration(
            model=model, alpha=self.alpha().tolist(), text_threshold=tt, vision_threshold=tv,
            fit={**fit, "samples": len(self.rows), "seed": self.cfg.calibration_seed,
                 "split": "train", "kl": kl, "skip_ratio": skip_ratio(pairs),
                 "text_skip_ratio": float(skipped_2[TEXT] / routed_2[TEXT].clamp_min(1)),
                 "vision_skip_ratio": float(skipped_2[VISION] / routed_2[VISION].clamp_min(1)),
                 "layer_removal_kl": self.layer_kl_L2.tolist(),
                 "max_routing_weight": self.max_weight_L2.tolist(),
                 "grid_points": len(text_grid), "text_grid_top": text_grid[-1],
                 "vision_grid_top": vision_grid[-1], "evaluated": evaluated})


def model_identity(engine, checkpoint: str | None = None, step: int | None = None
                   ) -> CalibratedModel:
    """What a calibration file records about the model (collective: the weights' hash)."""
    m = engine.cfg.model
    return CalibratedModel(fingerprint=weights_fingerprint(engine.model, engine.env.ep_rank),
                           num_layers=m.num_layers, num_experts=m.num_experts,
                           moe_topk=m.moe_topk, checkpoint=checkpoint, step=step)


def calibrate(engine, train_dataset, cfg: ModesConfig, *, checkpoint: str | None = None,
              step: int | None = None, target_skip: float | None = None) -> Calibration:
    """Fit alpha and the thresholds on `cfg.calibration_samples` training samples (collective):
    the highest skip ratio within `cfg.kl_bound`, or with `target_skip` the lowest KL at that
    skip ratio. The skipper is left as it was."""
    identity = model_identity(engine, checkpoint, step)
    calibrator = Calibrator(engine, train_dataset, cfg)
    try:
        if target_skip is None:
            found = calibrator.search_kl_bound(cfg.kl_bound)
            return calibrator.calibration(found, identity, objective="max_skip_within_kl",
                                          kl_bound=cfg.kl_bound)
        found = calibrator.search_skip_target(target_skip)
        return calibrator.calibration(found, identity, objective="min_kl_at_skip",
                                      target_skip=target_skip)
    finally:
        calibrator.restore()


def verify_calibration(engine) -> Calibration | None:
    """CalibrationError unless the file of the `modes` section (whose alpha and thresholds the
    model took at construction) was fitted to the weights the engine holds now (collective: the
    weights' hash). None when skipping is off or no file is named."""
    cfg = engine.cfg.modes
    if not cfg.enabled or cfg.calibration is None:
        return None
    calib = load_calibration(cfg.calibration, num_layers=engine.cfg.model.num_layers)
    check_fingerprint(calib, weights_fingerprint(engine.model, engine.env.ep_rank),
                      cfg.calibration)
    return calib


def main(argv: list[str] | None = None) -> int:
    from epruntime import checkpoint, distributed
    from epruntime.cli import config_parser
    from epruntime.predict import build_engine, checkpoint_vocab, load_inference_config

    parser = config_parser("epruntime.modes.calibrate", __doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint step directory, or a training output_dir (-> latest)")
    parser.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    parser.add_argument("--target-skip", type=float, dest="target_skip",
                        help="instead of the KL bound: the lowest KL at this skip ratio (0..1)")
    args = parser.parse_args(argv)
    if args.target_skip is not None and not 0 <= args.target_skip <= 1:
        raise ConfigError(f"--target-skip={args.target_skip}: expected a skip ratio in [0, 1]")
    path = checkpoint.resolve_checkpoint(args.checkpoint)
    # the model as trained, skipping off while calibrating
    cfg, meta = load_inference_config(path, args.config, [*args.overrides,
                                                          "modes.enabled=false"])
    vocab = checkpoint_vocab(meta, cfg)
    env = distributed.init_distributed(cfg)
    try:
        from epruntime.datasets import build_datasets

        t0 = time.perf_counter()
        train_ds, _ = build_datasets(cfg)
        engine, meta = build_engine(cfg, env, vocab, path)
        calib = calibrate(engine, train_ds, cfg.modes, checkpoint=str(path), step=meta["step"],
                          target_skip=args.target_skip)
        if env.is_main:
            calib.save(args.out)
            fit = calib.fit
            print(f"MoDES calibration ({fit['samples']} training samples, "
                  f"{time.perf_counter() - t0:.1f} s): text_threshold={calib.text_threshold:.4g} "
                  f"vision_threshold={calib.vision_threshold:.4g} skip_ratio="
                  f"{fit['skip_ratio']:.4f} (text {fit['text_skip_ratio']:.4f}, vision "
                  f"{fit['vision_skip_ratio']:.4f}) kl={fit['kl']:.3g} -> {args.out}", flush=True)
        dist.barrier()
        return 0
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    from epruntime.cli import run

    run(main, "epruntime.modes.calibrate")
