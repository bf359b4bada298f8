"""Exact long-sequence attention: blockwise kernels, ring attention over a mesh axis, load-balanced layouts.

The names below load their modules (and jax) on first use, so `lvm.attention.chunking` (what a config checks)
imports without jax.
"""

import importlib

_HOMES = {
    "LAYOUTS": "chunking",
    "dense_attention": "dense",
    "from_layout": "layout",
    "global_permutation": "layout",
    "to_layout": "layout",
    "ring_attention": "ring",
    "ring_block_counts": "ring",
    "sharded_attention": "ring",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lvm.attention' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lvm.attention.{_HOMES[name]}"), name)
