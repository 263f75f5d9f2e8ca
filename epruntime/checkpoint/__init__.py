"""Checkpoints on torch.distributed.checkpoint: atomic, verified, loadable at any EP size and
under any expert placement, each rank reading only what it holds.

    layout.py   where checkpoints live, what makes one complete, meta.json, resume scanning
    resume.py   prepare_run: writable output_dir, .tmp clean-up, which checkpoint to resume
    state.py    one rank's state as flat {key: tensor}, keyed by logical expert
    storage.py  DCP writer that commits atomically with per-tensor crc32s; verifying reader
    save.py     Checkpointer (sync or DCP async_save), save_checkpoint
    load.py     load_checkpoint, placements, model compatibility
    legacy.py   format version 1 (rank*.pt), for the converter and the benchmark
    convert.py  `python -m epruntime.checkpoint.convert`: version 1 -> this format
"""

from epruntime.checkpoint.layout import (CheckpointError, check_format, checkpoint_root, damage,
                                         describe_os_error, latest_checkpoint, read_meta,
                                         repair_latest, resolve_checkpoint, step_dirs)
from epruntime.checkpoint.load import (ReadStats, check_compatible, load_checkpoint,
                                       load_checkpoint_with_stats, saved_placements)
from epruntime.checkpoint.resume import prepare_run
from epruntime.checkpoint.save import Checkpointer, save_checkpoint

__all__ = ["CheckpointError", "Checkpointer", "ReadStats", "check_compatible", "check_format",
           "checkpoint_root",
           "damage", "describe_os_error", "latest_checkpoint", "load_checkpoint",
           "load_checkpoint_with_stats", "prepare_run", "read_meta", "repair_latest",
           "resolve_checkpoint", "save_checkpoint", "saved_placements", "step_dirs"]
