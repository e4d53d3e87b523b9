"""Benchmarks for `make bench`: figures, and ratios against a baseline of the same run."""
