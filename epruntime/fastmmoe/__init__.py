"""Training-free inference reduction for visual tokens: FastMMoE (arXiv 2511.17885) reduced
expert activation and routing-aware pruning, with FastV and text-to-vision attention pruning as
baselines through the same path, and analytic FLOPs accounting (config section `fastmmoe`)."""

from epruntime.fastmmoe.activation import reduce_topk
from epruntime.fastmmoe.flops import FlopCounter
from epruntime.fastmmoe.policies import build_policy
from epruntime.fastmmoe.reducer import TokenReducer, TokenState

__all__ = ["FlopCounter", "TokenReducer", "TokenState", "build_policy", "reduce_topk"]
