"""Sequence layouts for ring attention: which global token sits at each stored position.

With causal attention and the sequence split into `sp` contiguous shards, device r needs the
keys of devices 0..r only: device 0 finishes after one ring step while device sp-1 works on
all sp steps, and every step waits for the slowest device. A load-balanced layout reorders
the tokens once, on the data side, so every device holds early and late tokens alike:

- "contiguous": stored order = natural order.
- "zigzag" (dual-chunk swap): cut the sequence into 2*sp chunks; device r holds chunk r and
  chunk 2*sp-1-r. Every ring step then has exactly half of its work unmasked on every device.
  Needs seq_len % (2*sp) == 0.
- "striped" (Brandon et al. 2023, arXiv:2311.09431): device r holds tokens r, r+sp, r+2*sp...
  Every block pair is then about half masked, skipped at chunk level inside the kernel.

Worked example, 8 tokens on sp=4 devices (2 per device), `global_index(layout, 8, 4)`:

    contiguous  [0, 1, 2, 3, 4, 5, 6, 7]     device 0: [0, 1]  device 3: [6, 7]
    zigzag      [0, 7, 1, 6, 2, 5, 3, 4]     device 0: [0, 7]  device 3: [3, 4]
    striped     [0, 4, 1, 5, 2, 6, 3, 7]     device 0: [0, 4]  device 3: [3, 7]

The data side applies `to_layout` to every [batch, seq] array of a batch (tokens, targets,
loss masks, segment ids) and to the RoPE positions (`to_layout(np.arange(seq)[None], ...)`
is `global_index`), so each token keeps its own position and target; attention then masks
causally by `global_index`, and a loss summed over tokens is unchanged. `from_layout` undoes
it (e.g. on logits). With sp == 1 every layout is the identity.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str, seq_len: int, sp: int) -> None:
    """Raise ValueError if `layout` is unknown or cannot split seq_len tokens over sp devices."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if sp < 1:
        raise ValueError(f"sp={sp} must be >= 1")
    if seq_len % sp:
        raise ValueError(f"sequence length {seq_len} is not divisible by sp={sp}")
    if layout == "zigzag" and sp > 1 and seq_len % (2 * sp):
        raise ValueError(f"zigzag layout needs the sequence length {seq_len} divisible by 2*sp={2 * sp}")


@functools.lru_cache(maxsize=64)
def _global_index(layout: str, seq_len: int, sp: int) -> np.ndarray:
    check_layout(layout, seq_len, sp)
    if sp == 1 or layout == "contiguous":
        index = np.arange(seq_len)
    elif layout == "zigzag":
        chunks = np.arange(seq_len).reshape(2 * sp, seq_len // (2 * sp))  # [2*sp, chunk]
        order = np.stack([np.arange(sp), 2 * sp - 1 - np.arange(sp)], axis=1).reshape(-1)  # 0, 2sp-1, 1, ...
        index = chunks[order].reshape(-1)
    else:  # striped: stored slot i of device r holds token i*sp + r
        index = np.arange(seq_len).reshape(seq_len // sp, sp).T.reshape(-1)
    index = index.astype(np.int32)
    index.setflags(write=False)
    return index


def global_index(layout: str, seq_len: int, sp: int) -> np.ndarray:
    """[seq_len] int32: the natural-order index of the token stored at each position."""
    return _global_index(layout, int(seq_len), int(sp))


def chunk_limit(layout: str, seq_len: int, sp: int) -> int:
    """Largest useful attention chunk for a device's shard: seq_len/sp, or seq_len/(2*sp) for zigzag.

    A zigzag shard is two runs of the sequence far apart; a chunk spanning both would pair
    early queries with late keys and could never be skipped, so chunks stop at the half.
    """
    check_layout(layout, seq_len, sp)
    local = seq_len // sp
    return local // 2 if layout == "zigzag" and sp > 1 else local


def _take(x, index, axis):
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=axis)
    return jnp.take(x, jnp.asarray(index), axis=axis)


def to_layout(x, layout: str, sp: int, axis: int = 1):
    """Reorder x (numpy or jax) from natural order into `layout` along `axis`."""
    return _take(x, global_index(layout, x.shape[axis], sp), axis)


def from_layout(x, layout: str, sp: int, axis: int = 1):
    """Inverse of `to_layout`: reorder x from `layout` back into natural order along `axis`."""
    inverse = np.argsort(global_index(layout, x.shape[axis], sp)).astype(np.int32)
    return _take(x, inverse, axis)
