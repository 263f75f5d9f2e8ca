"""Shared command-line handling: `--config`, repeatable `--set a.b=value`, and errors that a user
can act on printed as one named line with a non-zero exit instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from epruntime.config import ConfigError

EXIT_USAGE = 2


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config (defaults apply to anything it omits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. parallel.ep_size=2")
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from epruntime.checkpoint import CheckpointError
    from epruntime.compat import MegatronVersionError
    from epruntime.distributed import ConfigMismatchError

    return ConfigError, CheckpointError, ConfigMismatchError, MegatronVersionError


def run(main: Callable[[], int | None], prog: str) -> None:
    """Run `main`; a user error (bad config, checkpoint, mismatch) exits 2 with one message."""
    try:
        code = main()
    except user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code or 0)
