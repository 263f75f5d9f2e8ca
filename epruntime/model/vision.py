"""The vision side of the MoE-VLM: an encoder, then a projector to the language model's width.

    images [B, C, H, W] -> encoder -> features [B, P, F] -> projector -> vision tokens [B, P, D]

P = (image_size / patch_size)^2 whatever the encoder: each vision token stands for one
patch_size x patch_size region, so the number of vision tokens (what token reduction prunes) is
set by `model.patch_size` alone. Encoders (`model.vision.kind`):

- `patch`: no encoder; the raw pixels of each patch (F = C * p * p). The projector alone sees
  pixels, as in the earliest patch-projector models.
- `conv`: a convolutional stem, 3x3 convs of stride 2 (`model.vision.channels`, one per halving)
  with GELU; the pixels and every stage are average-pooled to the token grid and concatenated.
  Its receptive field spans several patches, so a token knows about the shape it is part of,
  not only its own pixels.
- `vit`: a small ViT (Dosovitskiy et al. 2021): patch embedding, learned positions and
  `model.vision.layers` pre-norm bidirectional transformer blocks (torch's encoder layer).

The projector is LLaVA's: LayerNorm then a two-layer GELU MLP. Every normalisation is per
sample (LayerNorm, never BatchNorm), so a sample's tokens do not depend on the other
samples of its batch or on how the batch is split over ranks (EP equivalence holds).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from epruntime.config import ModelConfig


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class PatchPixels(nn.Module):
    """No encoder: the pixels of each patch. [B, C, H, W] -> [B, P, C*p*p]."""

    def __init__(self, channels: int, patch: int):
        super().__init__()
        self.patch, self.out_dim = patch, channels * patch * patch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch)


class ConvStem(nn.Module):
    """Strided 3x3 convs with GELU, each stage's output (and the pixels) average-pooled to the
    token grid and concatenated per token, as hypercolumns (Hariharan et al. 2015): early
    stages keep a token's own colours on a short path, later ones see the shape around it.
    [B, C, H, W] -> [B, (H/p)^2, C + sum(channels)], tokens in row-major order."""

    def __init__(self, in_channels: int, channels: list[int], grid: int,
                 global_context: bool = False, pool: str = "avg"):
        super().__init__()
        self.grid, self.global_context = grid, global_context
        self.pool = F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d
        self.out_dim = in_channels + sum(channels) + (channels[-1] if global_context else 0)
        self.stages = nn.ModuleList()
        for width in channels:
            self.stages.append(nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.GELU()))
            in_channels = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1  # pixels [0, 1] -> [-1, 1]
        if x.device.type == "cpu":
            # oneDNN's convolutions (forward and backward) are faster on NHWC than on NCHW
            # activations at these small channel counts: the stem's step ~20% less on CPU.
            x = x.contiguous(memory_format=torch.channels_last)
        pooled = [F.adaptive_avg_pool2d(x, self.grid)]  # a token's mean colour
        for stage in self.stages:
            x = stage(x)
            pooled.append(self.pool(x, self.grid))
        if self.global_context:  # the whole image's last-stage mean, beside every token
            pooled.append(x.mean((2, 3), keepdim=True).expand_as(pooled[-1]))
        return torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)


class SmallViT(nn.Module):
    """Patch embedding + learned positions + pre-norm transformer encoder blocks + final norm.
    [B, C, H, W] -> [B, P, width]."""

    def __init__(self, in_channels: int, patch: int, num_patches: int, width: int, layers: int,
                 heads: int):
        super().__init__()
        self.patch, self.out_dim = patch, width
        self.embed = nn.Linear(in_channels * patch * patch, width)
        self.pos = nn.Parameter(torch.zeros(1, num_patches, width))
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor only matters with padding masks (none here); off, so torch
        # does not warn about it.
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x_BPW = self.embed(patchify(images, self.patch)) + self.pos
        return self.final_norm(self.blocks(x_BPW))


def build_encoder(m: ModelConfig, channels: int = 3) -> nn.Module:
    """The encoder `model.vision.kind` names: [B, C, H, W] -> [B, P, out_dim]."""
    grid = m.image_size // m.patch_size
    v = m.vision
    if v.kind == "patch":
        return PatchPixels(channels, m.patch_size)
    if v.kind == "conv":
        return ConvStem(channels, list(v.channels), grid, v.global_context, v.pool)
    return SmallViT(channels, m.patch_size, grid * grid, v.width, v.layers, v.heads)


# ---- pretrained encoders (epruntime.model.pretrain_vision writes them) -----------------------
class PretrainedEncoderError(ValueError):
    """A model.vision.pretrained file that is missing or was trained for another encoder."""


# The fields that shape the encoder's weights and what its tokens stand for, per kind; a
# pretrained file must match every one of them.
_SHAPING = {"conv": ("kind", "channels", "global_context", "pool"),
            "vit": ("kind", "width", "layers", "heads")}


def encoder_signature(m: ModelConfig) -> dict:
    """{"model.image_size": ..., "model.vision.kind": ..., ...}: what a pretrained encoder file
    records and is checked against."""
    sig = {"model.image_size": m.image_size, "model.patch_size": m.patch_size}
    for name in _SHAPING[m.vision.kind]:
        sig[f"model.vision.{name}"] = getattr(m.vision, name)
    return sig


def save_pretrained(path: str | Path, m: ModelConfig, encoder: nn.Module, figures: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    torch.save({"encoder_config": encoder_signature(m), "state_dict": state,
                "figures": figures}, path)


def load_pretrained(encoder: nn.Module, m: ModelConfig, path: str | Path) -> None:
    """Copy the weights of a pretrained encoder file into `encoder` (built for `m`), after
    checking that the file was trained for the same encoder config."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedEncoderError(
            f"model.vision.pretrained={path}: file not found (write it with python -m "
            "epruntime.model.pretrain_vision --config CONFIG --out PATH)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    want = encoder_signature(m)
    have = saved.get("encoder_config", {}) if isinstance(saved, dict) else {}
    # the kind first: another kind differs in every other field too
    for field in ["model.vision.kind", *sorted((set(want) | set(have)) - {"model.vision.kind"})]:
        if want.get(field) != have.get(field):
            raise PretrainedEncoderError(
                f"model.vision.pretrained={path} was trained for another encoder: {field}="
                f"{have.get(field)} there, {want.get(field)} in this config")
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            tensor.copy_(saved["state_dict"][name])


class VisionTower(nn.Module):
    """Encoder then projector: images [B, C, H, W] -> vision tokens [B, P, hidden].

    The projector's parameters sit on this module (`norm`, `fc1`, `fc2`), so the `patch` kind
    keeps the parameter names of the earlier projector-only model."""

    def __init__(self, m: ModelConfig, channels: int = 3):
        super().__init__()
        self.channels, self.image_size = channels, m.image_size
        self.encoder = build_encoder(m, channels)
        dim = self.encoder.out_dim
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, m.hidden_size)
        self.fc2 = nn.Linear(m.hidden_size, m.hidden_size)
        # Factored 2-D positions (ViT's "2-D positional embedding" ablation, Dosovitskiy et al.
        # 2021, appendix D.4, summed here rather than concatenated): token (r, c) gets
        # row[r] + col[c], so a query built from a question's row and column words can match
        # it linearly, where one embedding per raster index needs the decoder to learn the
        # factoring from data.
        if m.vision.grid_positions:
            grid = m.image_size // m.patch_size
            self.row_pos = nn.Parameter(torch.zeros(grid, m.hidden_size))
            self.col_pos = nn.Parameter(torch.zeros(grid, m.hidden_size))
        else:
            self.row_pos = self.col_pos = None

    @property
    def dtype(self) -> torch.dtype:
        return self.fc1.weight.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, P, D]."""
        x_BPF = self.norm(self.encoder(images))
        tokens_BPD = self.fc2(F.gelu(self.fc1(x_BPF)))
        if self.row_pos is None:
            return tokens_BPD
        return tokens_BPD + grid_positions(self.row_pos, self.col_pos)


def grid_positions(row_GD: torch.Tensor, col_GD: torch.Tensor) -> torch.Tensor:
    """Row [G, D] and column [G, D] embeddings -> [G*G, D], raster order (the tokens' order):
    entry r*G + c is row[r] + col[c]."""
    g, d = row_GD.shape
    return (row_GD[:, None] + col_GD[None]).reshape(g * g, d)
