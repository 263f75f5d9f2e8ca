"""Run a named benchmark: print a table and optionally write its JSON.

    python profiling/bench.py --list
    python profiling/bench.py moe_layer [--json PATH] [--repeats N] [--warmup N] [--quick] [...]
    python profiling/bench.py moe_layer --help      # the benchmark's own options
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python profiling/bench.py` puts profiling/ first, not the root
    sys.path.insert(0, str(ROOT))

from profiling import benchlib  # noqa: E402
from profiling.benchmarks import load_all  # noqa: E402

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    common.add_argument("--repeats", type=int, help="timed repeats (median is reported)")
    common.add_argument("--warmup", type=int, help="untimed calls before the timed ones")
    common.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    sub = parser.add_subparsers(dest="name", metavar="NAME")
    for bench in benchlib.benchmarks().values():
        p = sub.add_parser(bench.name, parents=[common], help=bench.description,
                           description=bench.description)
        if bench.add_arguments is not None:
            bench.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    load_all()
    # The only top-level options are flags, so the first bare word is the benchmark name.
    name = next((a for a in argv if not a.startswith("-")), None)
    try:
        if name is not None:
            benchlib.get(name)
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.list:
            for bench in benchlib.benchmarks().values():
                print(f"{bench.name:16s} {bench.description}")
            return 0
        if args.name is None:
            known = ", ".join(benchlib.benchmarks())
            raise benchlib.BenchUsageError(f"name a benchmark (known: {known}) or pass --list")
        result = benchlib.get(args.name).run(args)
    except benchlib.BenchUsageError as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    benchlib.print_table(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.to_json())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
