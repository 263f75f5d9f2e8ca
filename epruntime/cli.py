"""Shared command-line handling: `--config`, repeatable `--set a.b=value`, and errors that a user
can act on printed as one named line with a non-zero exit instead of a traceback.

Exit codes: 2 a user error (config, checkpoint, ranks started differently); 3 a collective timed
out after `parallel.timeout_s` or lost its peer (another rank hung or died).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from epruntime.config import ConfigError

EXIT_USAGE = 2
EXIT_COLLECTIVE = 3

# What gloo / NCCL / the TCP store say when a peer stops answering or goes away.
_TIMED_OUT = re.compile(r"timed out|timeout|deadline exceeded", re.IGNORECASE)
_LOST_PEER = re.compile(r"connection (closed|reset|refused)|broken pipe|peer|socket closed"
                        r"|NCCL communicator was aborted", re.IGNORECASE)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config (defaults apply to anything it omits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. parallel.ep_size=2")
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The error classes of the modules loaded so far (one that is not loaded raised nothing):
    a config error exits without importing torch and megatron-core."""
    found: list[type[BaseException]] = [ConfigError]
    for module, name in (("epruntime.checkpoint", "CheckpointError"),
                         ("epruntime.compat", "MegatronVersionError"),
                         ("epruntime.distributed", "ConfigMismatchError"),
                         ("epruntime.model.vlm", "InputError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def collective_failure(err: BaseException) -> str | None:
    """One actionable line when `err` is a collective that timed out or lost its peer after the
    process group came up; None for anything else."""
    context = sys.modules.get("epruntime.distributed")
    context = context.failure_context() if context is not None else None
    if context is None or not isinstance(err, RuntimeError):
        return None
    rank, timeout_s = context
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = (lines[0] if lines else type(err).__name__)[:200]
    if _TIMED_OUT.search(text):
        return (f"a collective timed out after {timeout_s:g} s (parallel.timeout_s): rank {rank} "
                "waited for a rank that hung, died or fell behind; check the other ranks' logs, "
                f"exit codes and hosts, or raise parallel.timeout_s for slow steps ({cause})")
    if _LOST_PEER.search(text):
        return (f"rank {rank} lost its connection to another rank in a collective (that rank "
                "died or its host went away; parallel.timeout_s="
                f"{timeout_s:g} s); check the other ranks' logs, exit codes and hosts ({cause})")
    return None


def run(main: Callable[[], int | None], prog: str) -> None:
    """Run `main`; a user error (bad config, checkpoint, mismatch, bad input) exits 2 with one
    message, a collective that timed out or lost its peer exits 3 with one message."""
    try:
        code = main()
    except user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except RuntimeError as err:
        message = collective_failure(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_COLLECTIVE)
    sys.exit(code or 0)
