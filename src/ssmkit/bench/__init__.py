"""Benchmarks: timing helpers, peer libraries, and the benchmark suites behind ``ssmkit bench``."""
