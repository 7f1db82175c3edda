"""Benchmarks shipped with the package (run them with `eft-fast bench`)."""
