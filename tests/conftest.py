import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread per rank, as the launcher gives each CPU rank: tests start several ranks
# on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def python_env():
    """Environment for subprocesses: the project importable, one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def python_bin() -> str:
    return sys.executable
