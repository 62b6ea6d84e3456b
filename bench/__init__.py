"""Benchmarks of the kernels (and later the training step); entry point: bench/run.py."""
