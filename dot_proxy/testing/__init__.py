"""Helpers for tests, benchmarks and the soak: real DNS software as subprocesses.

Not used by the proxy itself (tests/test_purity.py checks that nothing imports it); it needs the
test dependencies (trustme, dnspython).
"""
