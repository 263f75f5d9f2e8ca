"""`python -m epruntime.scale`: the projection benchmark's table (same options as
`python profiling/bench.py projection`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # profiling/ lives at the root

from profiling.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["projection", *sys.argv[1:]]))
