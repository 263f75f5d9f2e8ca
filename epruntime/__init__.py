"""epruntime: a modality-aware expert-parallel runtime for MoE vision-language models."""

__version__ = "0.1.0"
