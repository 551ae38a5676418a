"""Benchmarks that the project's tools (``tools/bench_*.py``) are thin CLIs over."""
