"""Shared pytest configuration for the test suite."""


def pytest_configure(config):
    # `pytest -m "not slow"` is the quick subset; CI runs everything.
    config.addinivalue_line("markers", "slow: takes more than ~20 s (multi-process Megatron runs)")
