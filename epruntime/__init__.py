"""epruntime: a modality-aware expert-parallel runtime for MoE vision-language models."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns at import that Transformer Engine / Apex are absent and about its own
# deprecated calls: never actionable on a CPU host, and printed once per rank.
for _pattern in (".*(Transformer Engine|Apex).*", ".*cuda_graph_scope.*",
                 ".*all_gather_into_tensor.*", ".*_all_gather_base.*"):
    _warnings.filterwarnings("ignore", message=_pattern)
