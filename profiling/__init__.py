"""Benchmarks of epruntime and megatron-core: `python profiling/bench.py --list`."""
