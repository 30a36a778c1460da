"""Benchmarks (not tests): `python -m lwm.benchmarks.<name>` prints a table and writes JSON."""


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a jitted n^3 float32 matmul on this machine (median of `repeats`): the rate
    the benchmarks compare their model FLOP rates with, measured in the same process."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9
