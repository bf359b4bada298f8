"""Exact long-sequence attention: blockwise kernels, ring attention over a mesh axis, load-balanced layouts."""

from lvm.attention.dense import dense_attention
from lvm.attention.layout import LAYOUTS, from_layout, global_permutation, to_layout
from lvm.attention.ring import ring_attention, ring_block_counts, sharded_attention

__all__ = [
    "LAYOUTS",
    "dense_attention",
    "from_layout",
    "global_permutation",
    "ring_attention",
    "ring_block_counts",
    "sharded_attention",
    "to_layout",
]
