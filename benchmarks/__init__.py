"""Reproducible benchmarks: ``python -m benchmarks.run`` and ``python -m benchmarks.speed``."""
