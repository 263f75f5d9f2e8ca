"""Per-token side information that travels alongside the hidden states.

megatron-core's router and dispatcher see only `hidden [S, B, H]`. What a modality-aware router
needs besides (the modality of every token) is published here for the duration of one forward
pass, in the same [S, B] layout, so routers read it without any change to megatron-core's call
signatures. Later stages (token pruning) replace it when they shorten the sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TEXT, VISION = 0, 1

_modality_SB: torch.Tensor | None = None


@contextlib.contextmanager
def token_context(modality_SB: torch.Tensor) -> Iterator[None]:
    """Publish `modality_SB` [S, B] int64 (0 text, 1 vision) for the enclosed forward pass."""
    global _modality_SB
    if modality_SB.dim() != 2:
        raise ValueError(f"modality_SB must be [S, B], got shape {tuple(modality_SB.shape)}")
    previous, _modality_SB = _modality_SB, modality_SB
    try:
        yield
    finally:
        _modality_SB = previous


def replace_modality(modality_SB: torch.Tensor) -> None:
    """Inside a token_context: the sequence was shortened (token pruning), publish its modality
    [S', B] for the layers that follow. Restored with the context's exit like the original."""
    global _modality_SB
    if _modality_SB is None:
        raise RuntimeError("replace_modality outside a token_context")
    if modality_SB.dim() != 2 or modality_SB.shape[1] != _modality_SB.shape[1]:
        raise ValueError(f"modality_SB must be [S', {_modality_SB.shape[1]}], got shape "
                         f"{tuple(modality_SB.shape)}")
    _modality_SB = modality_SB


def current_modality_T() -> torch.Tensor | None:
    """Modality of each token [S*B] in the order megatron-core flattens hidden [S, B, H]."""
    return None if _modality_SB is None else _modality_SB.reshape(-1)


def current_modality_SB() -> torch.Tensor | None:
    """Modality of each token [S, B] (0 text, 1 vision), or None outside a token context."""
    return _modality_SB
