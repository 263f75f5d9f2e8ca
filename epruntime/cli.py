"""Shared command-line handling: `--config`, repeatable `--set a.b=value`, and errors that a user
can act on printed as one named line with a non-zero exit instead of a traceback.

Exit codes (README "Exit codes"):
    0  done
    1  an unexpected error (a traceback: a bug to report)
    2  a user error: config, checkpoint, input, output directory, disk full, shm too small,
       ranks started differently
    3  a collective timed out after `parallel.timeout_s` or lost its peer (another rank hung or
       died); when that rank said why before it went, this rank names it
    4  a non-finite loss or gradient norm stopped training (nothing was updated or saved)

A failing rank also (best effort) publishes its line in the job's rendezvous store, so that the
ranks that only see a lost connection can name it, and writes it under `$EPRUNTIME_EXIT_DIR`
when a launch script set one: launch/torchrun.sh reports the first rank's line and code instead
of torchrun's own exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable

from epruntime.config import ConfigError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_COLLECTIVE = 3
EXIT_NONFINITE = 4
EXIT_DIR_ENV = "EPRUNTIME_EXIT_DIR"

# What gloo / NCCL / the TCP store say when a peer stops answering or goes away.
_TIMED_OUT = re.compile(r"timed out|timeout|deadline exceeded", re.IGNORECASE)
_LOST_PEER = re.compile(r"connection (closed|reset|refused)|broken pipe|peer|socket closed"
                        r"|NCCL communicator was aborted", re.IGNORECASE)

# (module, class, exit code): looked up only in modules already loaded, so a config error exits
# without importing torch and megatron-core.
_NAMED_ERRORS = (
    ("epruntime.config", "ConfigError", EXIT_USAGE),
    ("epruntime.checkpoint", "CheckpointError", EXIT_USAGE),
    ("epruntime.compat", "MegatronVersionError", EXIT_USAGE),
    ("epruntime.distributed", "ConfigMismatchError", EXIT_USAGE),
    ("epruntime.model.vlm", "InputError", EXIT_USAGE),
    ("epruntime.model.vision", "PretrainedEncoderError", EXIT_USAGE),
    ("epruntime.data.jsonl", "DataError", EXIT_USAGE),
    ("epruntime.placement.core", "PlacementError", EXIT_USAGE),
    ("epruntime.transport.shm", "ShmOverflowError", EXIT_USAGE),
    ("epruntime.engine", "NonFiniteError", EXIT_NONFINITE),
)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config (defaults apply to anything it omits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. parallel.ep_size=2")
    return parser


def named_errors() -> list[tuple[type[BaseException], int]]:
    """(error class, exit code) of the modules loaded so far (a module that is not loaded raised
    nothing)."""
    found = []
    for module, name, code in _NAMED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append((cls, code))
    return found


def user_errors() -> tuple[type[BaseException], ...]:
    """The classes that exit 2 with one line."""
    return tuple(cls for cls, code in named_errors() if code == EXIT_USAGE)


def _dist():
    return sys.modules.get("epruntime.distributed")


def collective_failure(err: BaseException) -> str | None:
    """One actionable line when `err` is a collective that timed out or lost its peer after the
    process group came up; None for anything else. Names the rank that failed first and why when
    it published its line in the rendezvous store."""
    dist_mod = _dist()
    context = dist_mod.failure_context() if dist_mod is not None else None
    if context is None or not isinstance(err, RuntimeError):
        return None
    rank, timeout_s = context
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = lines[0] if lines else type(err).__name__
    if len(cause) > 300:  # gloo's messages can carry whole key lists; cut at a word
        cause = cause[:300].rsplit(" ", 1)[0] + " ..."
    if not (_TIMED_OUT.search(text) or _LOST_PEER.search(text)):
        return None
    peer = dist_mod.published_failure(exclude=rank)
    if peer is not None:
        other, line = peer
        return (f"rank {rank} stopped because rank {other} failed first: {line}")
    if _TIMED_OUT.search(text):
        return (f"a collective timed out after {timeout_s:g} s (parallel.timeout_s): rank {rank} "
                "waited for a rank that hung, died or fell behind; check the other ranks' logs, "
                f"exit codes and hosts, or raise parallel.timeout_s for slow steps ({cause})")
    return (f"rank {rank} lost its connection to another rank in a collective (that rank "
            "died or its host went away; parallel.timeout_s="
            f"{timeout_s:g} s); check the other ranks' logs, exit codes and hosts ({cause})")


def _record_exit(code: int, line: str) -> None:
    """Leave `line` for the launch script (launch/torchrun.sh) under $EPRUNTIME_EXIT_DIR."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    try:
        with open(os.path.join(folder, f"rank{int(rank):05d}.json"), "w") as f:
            json.dump({"time": time.time(), "code": code, "rank": int(rank), "line": line}, f)
    except OSError:
        pass  # the launcher falls back to torchrun's own code


def _announce(line: str, code: int, publish: bool) -> None:
    """Tell the other ranks (rendezvous store) and the launcher ($EPRUNTIME_EXIT_DIR)."""
    dist_mod = _dist()
    if publish and dist_mod is not None:
        dist_mod.publish_failure(line)
    _record_exit(code, line)


def fail(prog: str, message: str, code: int, publish: bool = True) -> None:
    """Print one named line, tell the other ranks and the launcher, exit with `code`."""
    line = f"{prog}: error: {message}"
    print(line, file=sys.stderr, flush=True)
    _announce(line, code, publish)
    sys.exit(code)


def run(main: Callable[[], int | None], prog: str) -> None:
    """Run `main`; a named error exits with its code and one line (see the module docstring),
    a collective that timed out or lost its peer exits 3 with one line."""
    try:
        code = main()
    except BaseException as err:  # noqa: BLE001 - classified below, re-raised otherwise
        if isinstance(err, SystemExit):
            raise
        for cls, exit_code in named_errors():
            if isinstance(err, cls):
                fail(prog, str(err), exit_code)
        message = collective_failure(err) if isinstance(err, RuntimeError) else None
        if message is None:  # a bug: the traceback follows; the other ranks and launcher learn
            line = f"{prog}: unexpected error: {type(err).__name__}: {err}".splitlines()[0]
            _announce(line, EXIT_FAILURE, publish=True)
            raise
        fail(prog, message, EXIT_COLLECTIVE, publish=False)
    sys.exit(code or 0)
