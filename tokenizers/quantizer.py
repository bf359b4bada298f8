"""Vector quantizer: nearest-code lookup with an EMA codebook or l2-normalised codes, usage stats, dead-code restart.

Variables: `params/embedding [K, D]` for the l2 quantizer, `codebook/embedding [K, D]` (+ `cluster_size [K]`,
`embed_sum [K, D]`) for the EMA quantizer, and `codebook/hits [K]`: how often each code was chosen since the last
dead-code restart, for both. Under `jax.jit` with a batch sharded over devices all statistics are global.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def nearest_codes(z, codebook):
    """Index of the nearest codebook row for each vector: z `[N, D]`, codebook `[K, D]` -> int32 `[N]`."""
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dist = jnp.sum(codebook**2, axis=1)[None, :] - 2.0 * z @ codebook.T  # ||z||^2 is the same for every code
    return jnp.argmin(dist, axis=1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
    """Quantizes `z [..., D]` to its nearest code; returns (z_q with straight-through gradient, codes, losses)."""

    codebook_size: int
    dim: int
    mode: str = "ema"  # "ema" or "l2"
    decay: float = 0.99
    commitment: float = 0.25
    eps: float = 1e-5

    def setup(self):
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        shape = (self.codebook_size, self.dim)
        if self.mode == "l2":
            self._embedding = self.param("embedding", init, shape)
        else:
            self._ema_embedding = self.variable(
                "codebook", "embedding", lambda: init(self.make_rng("params"), shape)
            )
            self.cluster_size = self.variable(
                "codebook", "cluster_size", lambda: jnp.ones((self.codebook_size,))
            )
            self.embed_sum = self.variable("codebook", "embed_sum", lambda: self._ema_embedding.value)
        self.hits = self.variable("codebook", "hits", lambda: jnp.zeros((self.codebook_size,)))

    def codebook(self):
        """The codebook `[K, D]` as used for lookup (unit rows for the l2 quantizer)."""
        if self.mode == "l2":
            return l2_normalize(self._embedding)
        return self._ema_embedding.value

    def lookup(self, codes):
        """Code vectors `[..., D]` of integer codes `[...]`."""
        return jnp.take(self.codebook(), codes, axis=0)

    def __call__(self, z, train: bool = False):
        shape = z.shape
        z = z.reshape(-1, self.dim).astype(jnp.float32)
        if self.mode == "l2":
            z = l2_normalize(z)
        codebook = self.codebook()
        codes = nearest_codes(z, codebook)
        e = jnp.take(codebook, codes, axis=0)
        counts = jnp.zeros((self.codebook_size,), jnp.float32).at[codes].add(1.0)
        losses = {
            "commitment": self.commitment * jnp.mean((z - jax.lax.stop_gradient(e)) ** 2),
            "codebook": jnp.mean((jax.lax.stop_gradient(z) - e) ** 2) if self.mode == "l2" else jnp.zeros(()),
        }
        if train and self.is_mutable_collection("codebook"):
            self.hits.value = self.hits.value + counts
            if self.mode == "ema":
                self._ema_update(jax.lax.stop_gradient(z), codes, counts)
        z_q = z + jax.lax.stop_gradient(e - z)  # straight-through estimator
        probs = counts / counts.sum()
        stats = {
            "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
            "batch_usage": jnp.mean(counts > 0),
        }
        return z_q.reshape(shape), codes.reshape(shape[:-1]), losses | stats

    def _ema_update(self, z, codes, counts):
        sums = jnp.zeros((self.codebook_size, self.dim), jnp.float32).at[codes].add(z)
        d = self.decay
        cluster_size = d * self.cluster_size.value + (1 - d) * counts
        embed_sum = d * self.embed_sum.value + (1 - d) * sums
        n = jnp.sum(cluster_size)
        smoothed = (cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
        self._ema_embedding.value = embed_sum / smoothed[:, None]


def restart_dead_codes(variables: dict, latents, rng, mode: str) -> tuple[dict, jax.Array]:
    """Re-seed codes with zero hits from random rows of `latents [N, D]` and reset all hit counts.

    `variables` holds the quantizer's `params` and `codebook` collections (as dicts of the quantizer's own
    variables). Returns the new variables and the number of codes restarted.
    """
    params, codebook = dict(variables.get("params", {})), dict(variables["codebook"])
    dead = codebook["hits"] == 0  # [K]
    k = dead.shape[0]
    picks = jax.random.randint(rng, (k,), 0, latents.shape[0])
    fresh = latents[picks].astype(jnp.float32)  # [K, D]
    if mode == "l2":
        fresh = l2_normalize(fresh)
        params["embedding"] = jnp.where(dead[:, None], fresh, params["embedding"])
    else:
        codebook["embedding"] = jnp.where(dead[:, None], fresh, codebook["embedding"])
        size = jnp.where(dead, 1.0, codebook["cluster_size"])
        codebook["cluster_size"] = size
        codebook["embed_sum"] = jnp.where(dead[:, None], fresh, codebook["embed_sum"])
    codebook["hits"] = jnp.zeros_like(codebook["hits"])
    out = {"codebook": codebook}
    if params:
        out["params"] = params
    return out, jnp.sum(dead)
