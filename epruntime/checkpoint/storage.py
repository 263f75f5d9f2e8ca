"""torch.distributed.checkpoint's file-system storage, with what epruntime adds on each side.

Writing (`CommittingWriter`): the crc32 of every tensor travels with DCP's write results to the
coordinator, which writes DCP's `.metadata`, then meta.json with the integrity record, fsyncs,
renames `step_N.tmp` to `step_N` and moves `latest`. All of that happens inside DCP's `finish`,
so it runs after every rank has written and fsynced its shards, in the background thread when
the save is asynchronous, and a failure anywhere reaches every rank through DCP's own reduce.

Reading (`VerifyingReader`, `VerifyingLoadPlanner`): the metadata is unpickled with an allowlist
of DCP's metadata classes (no arbitrary objects from a file a user hands in), tensors are read
with DCP's `torch.load(weights_only=True)`, each tensor's crc32 is checked against meta.json, any
failure names the shard file, and the bytes this rank read are counted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItemType
from torch.futures import Future  # what DCP's storage layer returns and waits on

from epruntime.checkpoint.layout import (DCP_METADATA, META, CheckpointError, atomic_write_text,
                                         fsync_dir, os_error_in, sha256_of,
                                         write_failure)


def tensor_crc32(t: torch.Tensor) -> int:
    """crc32 of a tensor's bytes (any dtype, any shape, 0-d included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


# ---- write ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Commit:
    """What the coordinator does once every shard is durable: `tmp` becomes `final`."""

    tmp: Path
    final: Path
    meta: dict  # meta.json without its integrity record (filled in here)
    step: int
    move_latest: bool = True  # point `latest` at `final` (the converter leaves it alone)


class CommittingWriter(FileSystemWriter):
    """DCP's FileSystemWriter (one shard file per rank, fsynced), plus per-tensor crc32s and the
    atomic commit of the step directory in `finish` (coordinator)."""

    def __init__(self, commit: Commit, after_write: Callable[[], None] | None = None):
        super().__init__(commit.tmp, single_file_per_rank=True, sync_files=True,
                         thread_count=1, overwrite=False)
        self.commit = commit
        self.after_write = after_write  # fault injection: called once this rank's shard is on disk

    def write_data(self, plan: SavePlan, planner) -> Future:
        shard = self.path / f"{plan.storage_data.prefix}0.distcp"
        try:
            results = super().write_data(plan, planner).value()
        except (OSError, RuntimeError) as err:  # torch.save wraps a failed write's OSError
            os_err = os_error_in(err)
            if os_err is None:
                raise
            raise CheckpointError(write_failure(os_err, Path(os_err.filename or shard),
                                                self.commit.step)) from None
        crcs = {item.index.fqn: tensor_crc32(planner.resolve_data(item))
                for item in plan.items if item.type != WriteItemType.BYTE_IO}
        if len(crcs) != len(plan.items):
            raise CheckpointError("a checkpoint holds tensors only (got a non-tensor value)")
        if self.after_write is not None:
            self.after_write()
        out: Future = Future()
        out.set_result([dataclasses.replace(r, storage_data=(r.storage_data, crcs[r.index.fqn]))
                        for r in results])
        return out

    def finish(self, metadata: Metadata, results: list) -> None:
        c = self.commit
        tensors, files, plain = {}, {}, []
        for rank_results in results:
            rank_plain = []
            for r in rank_results:
                info, crc = r.storage_data
                tensors[r.index.fqn] = {"file": info.relative_path, "crc32": crc}
                end = info.offset + info.length
                files[info.relative_path] = max(files.get(info.relative_path, 0), end)
                rank_plain.append(dataclasses.replace(r, storage_data=info))
            plain.append(rank_plain)
        try:
            super().finish(metadata, plain)  # .metadata, fsynced
            for name, size in files.items():  # what the shards must measure when loaded
                on_disk = os.stat(c.tmp / name).st_size
                if on_disk != size:
                    raise CheckpointError(f"{c.tmp / name}: {on_disk} bytes on disk after the "
                                          f"write, {size} written")
            meta = {**c.meta, "integrity": {
                "metadata_sha256": sha256_of(c.tmp / DCP_METADATA),
                "files": {n: {"bytes": s} for n, s in sorted(files.items())},
                "tensors": dict(sorted(tensors.items()))}}
            atomic_write_text(c.tmp / META, json.dumps(meta, indent=1))
            fsync_dir(c.tmp)
            os.rename(c.tmp, c.final)  # a directory: fails rather than replace a non-empty one
            root = c.final.parent
            fsync_dir(root)
            if c.move_latest:
                atomic_write_text(root / "latest", c.final.name)
        except OSError as err:
            raise CheckpointError(write_failure(err, Path(err.filename or c.tmp),
                                                c.step)) from None


# ---- read ----------------------------------------------------------------------------------

# Everything a DCP `.metadata` pickle may name; anything else is refused before it is built.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
     ("torch.serialization", "_get_layout"),  # torch.layout by name, from torch's own table
     ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refers to {module}.{name}, which DCP metadata never "
                              "holds (not a checkpoint written by epruntime?); refusing to load it")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of the step directory `path`, unpickled with the allowlist above."""
    md = path / DCP_METADATA
    try:
        with open(md, "rb") as f:
            metadata = _MetadataUnpickler(f, md).load()
    except CheckpointError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError,
            ValueError) as err:
        raise CheckpointError(f"{md}: unreadable ({type(err).__name__}: {err}); restore it or "
                              "resume from another checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{md}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class _Counting(io.RawIOBase):
    """A read-only view that adds the bytes read through it to `counter[key]` (torch.load reads
    a tensor's zip headers more than once, so this is at least the stored length)."""

    def __init__(self, view, counter: dict, key: str):
        super().__init__()
        self.view, self.counter, self.key = view, counter, key

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        return self.view.seek(offset, whence)

    def tell(self):
        return self.view.tell()

    def readinto(self, b):
        n = self.view.readinto(b)
        self.counter[self.key] = self.counter.get(self.key, 0) + (n or 0)
        return n

    def read(self, size=-1):
        data = self.view.read(size)
        self.counter[self.key] = self.counter.get(self.key, 0) + len(data)
        return data


class VerifyingReader(FileSystemReader):
    """DCP's FileSystemReader over a step directory whose metadata was already read (and checked)
    by `read_dcp_metadata`: reads shard files one at a time so that a failure names the file,
    and counts the bytes it read from the files, per key (`bytes_by_key`, `files_read`)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata
        self._key_at = {(info.relative_path, info.offset): index.fqn
                        for index, info in metadata.storage_data.items()}
        self.bytes_by_key: dict[str, int] = {}
        self.files_read: set[str] = set()

    @property
    def bytes_read(self) -> int:
        return sum(self.bytes_by_key.values())

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata

    def _slice_file(self, file, sinfo):
        key = self._key_at[(sinfo.relative_path, sinfo.offset)]
        return _Counting(super()._slice_file(file, sinfo), self.bytes_by_key, key)

    def read_data(self, plan: LoadPlan, planner) -> Future:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            name = self.storage_data[item.storage_index].relative_path
            per_file.setdefault(name, []).append(item)
        for name, items in sorted(per_file.items()):
            shard = Path(self.path) / name
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except CheckpointError:
                raise
            except FileNotFoundError:
                raise CheckpointError(f"{shard}: shard file missing; restore it or resume from "
                                      "another checkpoint") from None
            except Exception as err:  # noqa: BLE001 - torch.load of damaged bytes: many kinds
                raise CheckpointError(f"{shard}: unreadable shard ({type(err).__name__}: "
                                      f"{str(err).splitlines()[0] if str(err) else ''}); "
                                      "restore it or resume from another checkpoint") from None
            self.files_read.add(name)
        done: Future = Future()
        done.set_result(None)
        return done


class VerifyingLoadPlanner(DefaultLoadPlanner):
    """Loads a flat {key: tensor} state dict in place, checking each tensor's crc32 against
    meta.json's record; never unpickles a non-tensor value."""

    def __init__(self, path: Path, tensors: dict[str, dict]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.path, self.expected = path, tensors

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        key = read_item.dest_index.fqn
        rec = self.expected.get(key)
        if rec is None:
            raise CheckpointError(f"{self.path}/{META}: no checksum for tensor {key}; restore "
                                  "it or resume from another checkpoint")
        got = tensor_crc32(tensor)
        if got != rec["crc32"]:
            raise CheckpointError(
                f"{self.path / rec['file']}: tensor {key} fails its checksum (crc32 {got:08x}, "
                f"{META} records {rec['crc32']:08x}): the shard is corrupted; restore it or "
                "resume from another checkpoint")

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(f"{self.path}: {read_item.dest_index.fqn} is a pickled object, not "
                              "a tensor; epruntime checkpoints hold tensors only")
