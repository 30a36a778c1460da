"""Attention kernels behind one interface.

`attention(q, k, v, segment_ids, causal=..., impl=...)` is what the model calls; see
`lwm/ops/reference.py` for the masking rule every kernel shares.
"""
from lwm.ops.reference import reference_attention

__all__ = ["reference_attention"]
