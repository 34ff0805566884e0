"""Benchmarks run by `longstream bench`: `e2e` (end-to-end streaming throughput) and its `roofline` counts."""
