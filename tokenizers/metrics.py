"""Reconstruction metrics on uint8-range images: PSNR and SSIM (Gaussian window 11, sigma 1.5), and code stats."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def psnr(a, b, max_value: float = 255.0):
    """Per-image PSNR in dB of `[..., H, W, C]` arrays on a 0..max_value scale -> `[...]` (capped at 100 dB)."""
    mse = jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2, axis=(-3, -2, -1))
    return jnp.minimum(10.0 * jnp.log10(max_value**2 / jnp.maximum(mse, 1e-10)), 100.0)


def _gaussian_filter(x, size: int = 11, sigma: float = 1.5):
    """Separable 'valid' Gaussian filter over H and W of `[B, H, W, C]`."""
    t = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    h = x.shape[1] - size + 1
    w = x.shape[2] - size + 1
    x = sum(g[i] * x[:, i : i + h] for i in range(size))
    return sum(g[i] * x[:, :, i : i + w] for i in range(size))


def ssim(a, b, max_value: float = 255.0):
    """Per-image mean SSIM of `[B, H, W, C]` arrays on a 0..max_value scale -> `[B]` (Wang et al. 2004)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def code_stats(counts: np.ndarray) -> dict[str, float]:
    """Codebook usage (share of codes used at least once) and perplexity of code counts `[K]`."""
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1.0)
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return {"codebook_usage": float(np.mean(counts > 0)), "perplexity": float(np.exp(entropy))}
