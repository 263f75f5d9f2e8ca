"""SMoES math: soft modality scores, momentum-adaptive bins, router losses and metrics.

SMoES: Soft Modality-guided Expert Specialization (arXiv 2604.23996). Pure tensor functions
plus thin stateful modules (Gaussian stats, EMA counts); wiring into the router lives elsewhere.
"""

from epruntime.smoes.bins import (
    ExpertModalityCounts,
    assign_bins,
    bin_members,
    counts_from_routing,
    text_preference,
)
from epruntime.smoes.losses import (
    BALANCE_LOSSES,
    bin_balance_loss,
    bin_scores,
    expert_balance_loss,
    mi_loss,
    mutual_information,
)
from epruntime.smoes.metrics import balancedness, msi, msi_from_joint, msi_from_routing
from epruntime.smoes.scores import (
    TEXT,
    VISION,
    GaussianModalityStats,
    attention_accumulate,
    hard_scores,
)

__all__ = [
    "BALANCE_LOSSES",
    "TEXT",
    "VISION",
    "ExpertModalityCounts",
    "GaussianModalityStats",
    "assign_bins",
    "attention_accumulate",
    "balancedness",
    "bin_balance_loss",
    "bin_members",
    "bin_scores",
    "counts_from_routing",
    "expert_balance_loss",
    "hard_scores",
    "mi_loss",
    "msi",
    "msi_from_joint",
    "msi_from_routing",
    "mutual_information",
    "text_preference",
]
