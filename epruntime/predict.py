"""Predictions from a checkpoint: batch predictions over a dataset (epruntime.infer --data) and an
in-process `Predictor` for use from Python.

    from epruntime.predict import Predictor
    predictor = Predictor("runs/scenes")            # build once: config, vocabulary, weights
    predictor([image, "what is in row 1, column 2?"], ...)   # see Predictor.__call__

Both encode questions and decode answers with the vocabulary the checkpoint was trained with
(meta.json `extra.data_vocab`, epruntime.data.jsonl.DataVocab), and run the model as evaluation does:
every rank of the job takes its share of the rows, the EP all-to-alls need every rank of the
group in every forward pass, and the predictions come back in input order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from epruntime import checkpoint
from epruntime.config import Config, apply_overrides, config_from_dict, load_config
from epruntime.data.jsonl import MISSING, DataError, DataVocab, load_image
from epruntime.data.vqa import PAD_ID


@dataclass(frozen=True)
class Prediction:
    answer: str
    probability: float  # softmax over the answers at the answer position
    label: int  # index of `answer` in the checkpoint's answer vocabulary


def load_inference_config(path: Path, config: str | None, overrides: list[str]) -> tuple[Config,
                                                                                      dict]:
    """(config, meta) of a checkpoint step directory: its own config with `overrides`, or the
    YAML `config` (with overrides) when given; the model sections must agree (CheckpointError)."""
    meta = checkpoint.read_meta(path)
    checkpoint.check_format(meta, path)  # another format version: named before any process group
    if config:
        cfg = load_config(config, overrides)
    else:
        cfg = config_from_dict(apply_overrides(meta["config"], overrides))
    checkpoint.check_compatible(meta, cfg, path)
    return cfg, meta


def checkpoint_vocab(meta: dict, cfg: Config) -> DataVocab:
    """The vocabulary the checkpoint was trained with: meta.json's `extra.data_vocab`, or, for a
    checkpoint written before it was recorded, rebuilt from the config's training data."""
    saved = meta.get("extra", {}).get("data_vocab")
    if saved is not None:
        return DataVocab.from_dict(saved)
    from epruntime.datasets import build_datasets

    return DataVocab.of_dataset(build_datasets(cfg)[0])


def build_engine(cfg: Config, env, vocab: DataVocab, path: Path):
    """An Engine for `vocab`'s sizes with the checkpoint's weights, in eval mode."""
    from epruntime.engine import Engine

    if cfg.model.vision.pretrained is not None:
        # The checkpoint holds the encoder's weights: its pretrained file is neither read nor
        # needed to predict (freeze first: freeze without a file is a config error).
        cfg = cfg.model_copy(deep=True)
        cfg.model.vision.freeze = False
        cfg.model.vision.pretrained = None
    engine = Engine(cfg, env, len(vocab.words), len(vocab.answers), vocab.max_question_len)
    from epruntime.placement.controller import PlacementController

    meta = checkpoint.load_checkpoint(engine, path, restore_training_state=False)
    from epruntime.modes.calibrate import verify_calibration

    verify_calibration(engine)  # modes.calibration was fitted to these weights (collective)
    PlacementController(engine).start()  # dispatch.placement=file:PATH moves the experts there
    engine.model.eval()
    return engine, meta


def occlude(images_BCHW: torch.Tensor, rows_B: torch.Tensor, fraction: float, patch: int,
            seed: int) -> torch.Tensor:
    """A copy of the images with round(fraction * patches) of each image's patch squares
    painted with that image's mean colour; which patches depends only on (seed, row), so a row
    is occluded the same way at any EP size and batch. [B, C, H, W] -> [B, C, H, W]."""
    b, c, h, w = images_BCHW.shape
    gh, gw = h // patch, w // patch
    n_drop = int(round(fraction * gh * gw))
    out = images_BCHW.clone()
    if n_drop == 0:
        return out
    mean_BC = images_BCHW.mean(dim=(2, 3))
    for i, row in enumerate(rows_B.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + row)
        for cell in torch.randperm(gh * gw, generator=g)[:n_drop].tolist():
            y, x = divmod(cell, gw)
            out[i, :, y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = \
                mean_BC[i][:, None, None]
    return out


# ---- batch predictions over a dataset (collective) --------------------------------------------
@torch.no_grad()
def predict_dataset(engine, dataset, batch_size: int | None = None) -> tuple[torch.Tensor,
                                                                               torch.Tensor, dict]:
    """Predict every row of `dataset` (any VQADataset; JsonlDataset rows without an answer are
    predicted, not scored). Collective: every rank calls it; rows are sharded over the data-
    parallel ranks as in Engine.evaluate (the last batch padded with row 0, not counted).

    Returns (labels [N] int64, probabilities [N] float64) in dataset order on every rank, and
    the figures: accuracy over the answered rows, FLOPs and visual tokens kept, routing
    statistics and the ledger's bytes."""
    from megatron.core import parallel_state as ps

    from epruntime.dispatch import CommLedger
    from epruntime.routing_stats import RoutingRecorder

    env, model = engine.env, engine.model
    n, dp, rank = len(dataset), env.dp_size, env.dp_rank
    batch_size = batch_size or max(1, engine.cfg.data.eval_batch_size // dp)
    per_step = dp * batch_size
    occlude_fraction = engine.cfg.infer.occlude_vision
    occlude_seed, patch = engine.cfg.infer.occlude_seed, engine.cfg.model.patch_size
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(model, engine.cfg.num_bins)
    ledger = CommLedger(engine.cfg.model.num_moe_layers, env.ep_size, env.ep_rank,
                        engine.ranks_per_node)
    model.reducer.reset_stats()
    model.skipper.reset_stats()
    rows, labels, probs = [], [], []
    forward_s = 0.0
    try:
        with engine.observing(ledger):
            for start in range(0, n, per_step):
                idx = torch.arange(start + rank * batch_size, start + (rank + 1) * batch_size)
                valid = idx < n
                rows_B = torch.where(valid, idx, 0)
                batch = dataset.batch(rows_B)
                images = batch.images
                if occlude_fraction > 0:  # infer.occlude_vision: how much the image matters
                    images = occlude(images, rows_B, occlude_fraction, patch, occlude_seed)
                batch = batch.to(env.device)
                t0 = time.perf_counter()
                logits = model(images.to(env.device), batch.question_ids, batch.question_lens)
                p_BA = torch.softmax(logits.float(), dim=-1)
                prob, label = p_BA.max(dim=-1)
                # host sync: one per batch, this rank's predictions for the output file
                rows.append(idx[valid])
                labels.append(label.cpu()[valid])
                probs.append(prob.double().cpu()[valid])
                forward_s += time.perf_counter() - t0
            prefill = engine._prefill_summary(forward_s)  # FLOPs, tokens kept (collective)
            routing = recorder.summary(ps.get_data_parallel_group())
            comm = engine.comm_summary()  # this pass's ledger
    finally:
        recorder.close()
        model.train(was_training)
    mine = (torch.cat(rows), torch.cat(labels), torch.cat(probs))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)  # every rank's rows, in any order
    all_rows = torch.cat([e[0] for e in everyone])
    order = all_rows.argsort()
    if not torch.equal(all_rows[order], torch.arange(n)):
        raise RuntimeError(f"predictions cover rows {all_rows.tolist()[:10]}..., expected 0..{n-1}")
    # Data-parallel replicas of one row (none with TP = PP = 1) would repeat it; rows are unique.
    out_labels = torch.cat([e[1] for e in everyone])[order]
    out_probs = torch.cat([e[2] for e in everyone])[order]
    answered = dataset.answers != MISSING
    figures: dict[str, Any] = {"items": n, "answered_items": int(answered.sum())}
    if bool(answered.any()):
        hits = (out_labels[answered] == dataset.answers[answered]).sum()
        figures["eval_accuracy"] = float(hits) / int(answered.sum())
        figures["majority_baseline"] = dataset.majority_baseline()
    return out_labels, out_probs, {**figures, **routing, **prefill, "comm": comm}


def prediction_lines(dataset, labels: torch.Tensor, probs: torch.Tensor) -> list[dict]:
    """One dict per row in dataset order: id, answer, probability, and reference when given."""
    ids = getattr(dataset, "example_ids", None) or list(range(len(dataset)))
    refs = getattr(dataset, "references", None)
    answers = dataset.answers_vocab
    out = []
    for i, (label, prob) in enumerate(zip(labels.tolist(), probs.tolist())):
        line = {"id": ids[i], "answer": answers[label], "probability": round(prob, 6)}
        ref = refs[i] if refs is not None else answers[int(dataset.answers[i])]
        if ref is not None:
            line["reference"] = ref
        out.append(line)
    return out


def write_predictions(path: Path, lines: list[dict]) -> Path:
    """predictions.jsonl, written whole then renamed (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    tmp.replace(path)
    return path


# ---- in-process Predictor ------------------------------------------------------------------
class Predictor:
    """Build once from a checkpoint, then call it on batches of (image, question).

    Limits: it runs in one process as a world of one (EP size 1, all experts in this process,
    created on first use and released by `close()`), or inside a process group the caller has
    already initialised with epruntime.distributed.init_distributed (any EP size): then every
    rank of the group must build the Predictor and call it the same number of times (each on its
    own batch; the EP all-to-alls need all ranks), as with any collective. Questions are encoded
    with the checkpoint's vocabulary (unknown words become <unk>); a question longer than the
    model's question length is a DataError. FastMMoE reduction applies when the config's
    fastmmoe section enables it (pass `overrides`). Not thread-safe.
    """

    def __init__(self, checkpoint_path: str | Path, overrides: Sequence[str] = (),
                 config: str | None = None, batch_size: int = 64):
        from epruntime import distributed

        path = checkpoint.resolve_checkpoint(checkpoint_path)
        overrides = list(overrides)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            overrides.append("parallel.ep_size=1")  # a world of one holds every expert
        cfg, meta = load_inference_config(path, config, overrides)
        self.vocab = checkpoint_vocab(meta, cfg)
        self._words = self.vocab.vocab
        self.batch_size = batch_size
        self.cfg = cfg
        self.env = distributed.init_distributed(cfg) if self._owns_group else _current_env(cfg)
        try:
            self.engine, self.meta = build_engine(cfg, self.env, self.vocab, path)
        except BaseException:
            self.close()
            raise

    @property
    def answers(self) -> tuple[str, ...]:
        return self.vocab.answers

    def encode_questions(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L] token ids, [B] lengths); DataError naming the index of a bad question."""
        L = self.vocab.max_question_len
        ids = torch.full((len(questions), L), PAD_ID, dtype=torch.long)
        lens = torch.empty(len(questions), dtype=torch.long)
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise DataError(f"questions[{i}]: expected a string, got {type(q).__name__}")
            tokens = self._words.encode(q)
            if not tokens:
                raise DataError(f"questions[{i}]: empty question ({q!r} has no words)")
            if len(tokens) > L:
                raise DataError(f"questions[{i}]: {len(tokens)} tokens, more than the model "
                                f"takes (max_question_len={L})")
            ids[i, :len(tokens)] = torch.tensor(tokens)
            lens[i] = len(tokens)
        return ids, lens

    def encode_images(self, images) -> torch.Tensor:
        """[B, 3, S, S] float32 in [0, 1] at the model's image size, from a list of PIL images,
        [H, W, 3] uint8 arrays or file paths, or a float tensor [B, 3, S, S] as it is."""
        s = self.cfg.model.image_size
        if isinstance(images, torch.Tensor):
            return images.float()
        out = []
        for i, im in enumerate(images):
            try:
                if isinstance(im, (str, Path)):
                    arr = load_image(Path(im), s)
                else:
                    from PIL import Image

                    pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
                    pil = pil.convert("RGB")
                    if pil.size != (s, s):
                        pil = pil.resize((s, s), Image.BILINEAR)
                    arr = np.asarray(pil, dtype=np.uint8)
            except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a bad image
                raise DataError(f"images[{i}]: unreadable image ({type(err).__name__}: "
                                f"{err})") from None
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        return torch.stack(out).float().div_(255.0)

    @torch.no_grad()
    def __call__(self, images, questions: Sequence[str]) -> list[Prediction]:
        """Predict a batch: `images` (see encode_images) and `questions`, one per image."""
        if len(images) != len(questions):
            raise DataError(f"{len(images)} images for {len(questions)} questions")
        ids, lens = self.encode_questions(questions)
        pixels = self.encode_images(images)
        model, device = self.engine.model, self.env.device
        model.eval()
        out = []
        for start in range(0, len(questions), self.batch_size):
            part = slice(start, start + self.batch_size)
            logits = model(pixels[part].to(device), ids[part].to(device), lens[part].to(device))
            prob, label = torch.softmax(logits.float(), -1).max(-1)
            for p, a in zip(prob.tolist(), label.tolist()):  # host sync: the results
                out.append(Prediction(self.vocab.answers[a], p, a))
        return out

    def close(self) -> None:
        """Release the process group this Predictor created (none when it joined one)."""
        if self._owns_group:
            from epruntime import distributed

            distributed.shutdown()
            self._owns_group = False

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _current_env(cfg: Config):
    """The DistEnv of a process group initialised by the caller (megatron-core's groups too)."""
    import os

    from megatron.core import parallel_state as ps

    from epruntime.distributed import DistEnv, pick_backend

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("Predictor inside a process group needs megatron-core's groups: "
                           "initialise it with epruntime.distributed.init_distributed(cfg)")
    ep = ps.get_expert_model_parallel_world_size()
    if ep != cfg.parallel.ep_size:
        raise RuntimeError(f"the process group has EP size {ep}, the config parallel.ep_size="
                           f"{cfg.parallel.ep_size}; pass overrides=['parallel.ep_size={ep}']")
    backend = pick_backend(cfg)
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    world = dist.get_world_size()
    return DistEnv(rank=dist.get_rank(), world_size=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                   ep_size=ep, ep_rank=ps.get_expert_model_parallel_rank(),
                   dp_size=ps.get_data_parallel_world_size(),
                   dp_rank=ps.get_data_parallel_rank(), backend=backend, device=device)
