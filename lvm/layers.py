"""Position-wise building blocks of the decoder: RMSNorm, rotary embeddings, SwiGLU. Pure functions of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., d] / rms(x) * weight [d], computed in float32, returned in x's dtype."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(F32)).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, head_dim/2] (float32) of RoPE positions [batch, seq]."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=F32) / head_dim)
    angles = positions.astype(F32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by the angles; `layout` says which dims pair up.

    "interleaved" (LWM / original LLaMA): dims (2i, 2i+1); "half" (Hugging Face): dims (i, i + head_dim/2).
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(F32)
    if layout == "interleaved":
        a, b = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    elif layout == "half":
        a, b = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    else:
        raise ValueError(f"unknown rope layout {layout!r}; choose 'interleaved' or 'half'")
    return out.astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU feed-forward: (silu(x @ w_gate) * (x @ w_up)) @ w_down; x [..., d], w_* [d, mlp] / [mlp, d]."""
    gate = jnp.einsum("...d,df->...f", x, w_gate)
    up = jnp.einsum("...d,df->...f", x, w_up)
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down)
