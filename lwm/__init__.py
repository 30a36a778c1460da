"""Large World Models in JAX/Flax (a faithful reimplementation of LWM, Liu et al. 2024)."""

__version__ = "0.1.0"
