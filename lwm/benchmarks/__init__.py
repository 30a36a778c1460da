"""Benchmarks (not tests): `python -m lwm.benchmarks.<name>` prints a table and writes JSON."""
