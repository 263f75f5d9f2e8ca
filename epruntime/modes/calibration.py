"""The MoDES calibration file: alpha per (layer, modality), the two thresholds, and which model
they were fitted to.

    {"format": "epruntime-modes-calibration", "version": 1,
     "model": {"fingerprint": sha256 of the weights, "num_layers", "num_experts", "moe_topk",
               "checkpoint", "step"},
     "alpha": [[text, vision], ...one per layer], "text_threshold", "vision_threshold",
     "fit": {...what the calibration measured: samples, seed, kl_bound, kl, skip ratios,
             per-layer removal KLs, the evaluated grid points}}

A file for other weights (another checkpoint, another run) is a CalibrationError: alpha and the
thresholds describe one set of weights. The weights' fingerprint is a sha256 over every
parameter under its global name (experts by logical expert), so it is the same at any EP size.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from epruntime.config import ConfigError

FORMAT, VERSION = "epruntime-modes-calibration", 1


class CalibrationError(ConfigError):
    """A calibration file that cannot be used (missing, malformed, another model's); exit 2."""


class CalibratedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fingerprint: str
    num_layers: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    moe_topk: int = Field(gt=0)
    checkpoint: str | None = None
    step: int | None = None


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    format: str = FORMAT
    version: int = VERSION
    model: CalibratedModel
    alpha: list[list[float]]  # [L][text, vision]
    text_threshold: float = Field(ge=0, le=1)
    vision_threshold: float = Field(ge=0, le=1)
    fit: dict[str, Any] = {}

    @field_validator("alpha")
    @classmethod
    def _alpha_shape(cls, value: list[list[float]]) -> list[list[float]]:
        if not value or any(len(row) != 2 for row in value):
            raise ValueError("expected one [text, vision] pair per layer")
        if any(not math.isfinite(a) or a < 0 for row in value for a in row):
            raise ValueError("every alpha must be finite and >= 0")
        return value

    def alpha_tensor(self) -> torch.Tensor:
        return torch.tensor(self.alpha, dtype=torch.float64)

    def save(self, path: str | Path) -> Path:
        """Written whole, then renamed (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)
        return path


def load_calibration(path: str | Path, *, num_layers: int | None = None,
                     num_experts: int | None = None, moe_topk: int | None = None) -> Calibration:
    """Read and check a calibration file (and, when given, that its model has these shapes);
    CalibrationError naming the file and the field otherwise."""
    path = Path(path)
    where = f"modes.calibration={path}"
    if not path.is_file():
        raise CalibrationError(f"{where}: no such file (write one with python -m "
                               "epruntime.modes.calibrate --checkpoint ... --out FILE)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CalibrationError(f"{where}: not a JSON file ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CalibrationError(f"{where}: not a MoDES calibration file (format {got!r}, "
                               f"expected {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise CalibrationError(f"{where}: calibration format version {raw.get('version')!r}, "
                               f"this epruntime reads version {VERSION}")
    try:
        calib = Calibration.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"])
        raise CalibrationError(f"{where}: field {field}: {e['msg']}") from None
    m = calib.model
    if len(calib.alpha) != m.num_layers:
        raise CalibrationError(f"{where}: alpha has {len(calib.alpha)} layers, its model "
                               f"{m.num_layers}")
    expected = {"num_layers": num_layers, "num_experts": num_experts, "moe_topk": moe_topk}
    for name, value in expected.items():
        if value is not None and getattr(m, name) != value:
            raise CalibrationError(
                f"{where} was calibrated for another model: model.{name}={getattr(m, name)} "
                f"there, {value} here (checkpoint {m.checkpoint}); calibrate this checkpoint")
    return calib


def check_fingerprint(calib: Calibration, fingerprint: str, path: str | Path) -> None:
    """CalibrationError unless `calib` was fitted to the weights with this fingerprint."""
    if calib.model.fingerprint != fingerprint:
        raise CalibrationError(
            f"modes.calibration={path} was calibrated for other weights (checkpoint "
            f"{calib.model.checkpoint}, step {calib.model.step}; weights fingerprint "
            f"{calib.model.fingerprint[:12]}..., these weights {fingerprint[:12]}...); calibrate "
            "this checkpoint with python -m epruntime.modes.calibrate")


def skipper_settings(cfg, model_cfg) -> tuple[torch.Tensor | None, tuple[float, float]]:
    """(alpha [L, 2] or None for ones, (text, vision) thresholds) for the `modes` section `cfg`
    of a model `model_cfg`: the calibration file's (its shapes checked), explicit thresholds
    over its; without a file, alpha 1 and the thresholds given (default 0)."""
    alpha, thresholds = None, [0.0, 0.0]
    if cfg.enabled and cfg.calibration is not None:
        calib = load_calibration(cfg.calibration, num_layers=model_cfg.num_layers,
                                 num_experts=model_cfg.num_experts, moe_topk=model_cfg.moe_topk)
        alpha, thresholds = calib.alpha_tensor(), [calib.text_threshold, calib.vision_threshold]
    if cfg.text_threshold is not None:
        thresholds[0] = cfg.text_threshold
    if cfg.vision_threshold is not None:
        thresholds[1] = cfg.vision_threshold
    return alpha, (thresholds[0], thresholds[1])


@torch.no_grad()
def weights_fingerprint(model, ep_rank: int) -> str:
    """sha256 over every parameter of the model (collective over the world when distributed:
    each rank hashes the parameters it holds under their global names, experts by logical
    expert, so the result is the same at any EP size and placement)."""
    import torch.distributed as dist

    mine = {}
    for name, param in model.global_named_parameters(ep_rank):
        data = param.detach().cpu().contiguous()  # host sync: a one-off read of the weights
        mine[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()
                                    + str((tuple(data.shape), data.dtype)).encode()).hexdigest()
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    merged: dict[str, str] = {}
    for part in everyone:
        merged.update(part)
    digest = hashlib.sha256()
    for name in sorted(merged):
        digest.update(f"{name}={merged[name]}\n".encode())
    return digest.hexdigest()
