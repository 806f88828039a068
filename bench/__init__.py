"""Benchmarks (run by hand: ``python -m bench [--quick]``); conventions in docs/performance.md."""
