"""Dense reference attention: materialises the full score matrix. For tests, benchmarks and short decodes."""

from __future__ import annotations

import jax.numpy as jnp


def dense_attention(q, k, v, *, causal=True, segment_ids=None):
    """q: [b, s, h, d]; k, v: [b, s, hk, d]; segment_ids: [b, s]. Returns [b, s, h, d] in q's dtype."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d**-0.5
    mask = jnp.ones((1, 1, s, s), bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((s, s), bool))[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)
