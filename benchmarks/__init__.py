"""Benchmarks for deadstop. Run `python benchmarks/kill_latency.py --help`."""
