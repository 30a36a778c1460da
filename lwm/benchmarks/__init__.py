"""Benchmarks (not tests): `python -m lwm.benchmarks.<name>` prints a table and writes JSON."""


class MatmulReference:
    """Times a jitted n^3 float32 matmul: the rate the benchmarks compare their model FLOP rates
    with, measured in the same process. `sample(k)` times k more matmuls (call it between the
    timed steps so the reference sees the same machine as they do); `gflops` is the median
    rate of every matmul timed so far."""

    def __init__(self, n: int = 2048):
        import jax
        import jax.numpy as jnp

        self.n = n
        self._a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self._b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self._dot = jax.jit(jnp.dot)
        self._dot(self._a, self._b).block_until_ready()
        self.rates: list[float] = []

    def sample(self, k: int = 1) -> "MatmulReference":
        import time

        for _ in range(k):
            t = time.perf_counter()
            self._dot(self._a, self._b).block_until_ready()
            self.rates.append(2 * self.n ** 3 / (time.perf_counter() - t) / 1e9)
        return self

    @property
    def gflops(self) -> float:
        import statistics

        return statistics.median(self.rates)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a jitted n^3 float32 matmul on this machine (median of `repeats`)."""
    return MatmulReference(n).sample(repeats).gflops
