"""Measurement scripts: the speed benchmark (``python -m mnv2lib.benchmarks.speed``, `make bench`), the
executors' throughput (``benchmarks.executors``) and the quick recipe's selection (``benchmarks.recipes``)."""
