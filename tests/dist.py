"""Run a function on N real ranks (torch.multiprocessing + gloo) from a test."""

from epruntime.distributed import spawn_local as spawn

__all__ = ["spawn"]
