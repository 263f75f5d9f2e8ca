"""What a visual-token compressor hands the language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compressed:
    vision_KBD: torch.Tensor  # [K, B, D] visual rows for the decoder, in sequence order
    # [B, K] the image position each row stands at (kept or seed token), None when rows are
    # mixtures with no single position (QMoP)
    position_BK: torch.Tensor | None = None
