"""Autoregressive generation over a sequence-sharded KV cache: sampling, text decoding, vision decoding.

`Generator` holds one model on one mesh and jits `prefill` (ring attention over sp, so a prompt longer than one
device's memory works) and `extend` (new tokens against the cache). Prompt lengths are padded to buckets
(multiples of `2 * sp * 64` with at most 4 significant bits: under 1/8 padding) so few shapes compile.

- `generate_text`: greedy / temperature / top-k / top-p sampling, a batch of prompts of different lengths,
  per-row stop at EOS, an `on_token(row, id)` callback for streaming. With `vocab_size` (the tokenizer's),
  the padded rows of a larger model vocabulary are masked in the jitted sampling step, so no id the tokenizer
  lacks is ever picked.
- `generate_vision`: frames of `tokens_per_frame` VQGAN codes each; `<eof>` (or `<eov>` after the last frame)
  is forced at frame boundaries and never sampled inside a frame; optional classifier-free guidance over
  pairs of conditional / unconditional rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lvm.batch import Batch, batch_shardings
from lvm.config import Config
from lvm.model import KVCache, cache_sharding, extend, prefill
from lvm.sharding import replicated

PAD_UNIT = 64  # prompt buckets are multiples of 2 * sp * PAD_UNIT tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Float32 logits [b, V] scaled by the temperature, -inf outside the top-k and the top-p nucleus."""
    logits = logits.astype(jnp.float32) / max(s.temperature, 1e-6)
    if s.top_k:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1:
        order = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        cutoff = jnp.min(jnp.where(before < s.top_p, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def mask_vocab(logits: jax.Array, vocab_size: int | None) -> jax.Array:
    """Logits [..., V] with -inf at the ids >= `vocab_size` (padded vocabulary rows no tokenizer id names);
    the others unchanged. None: no mask."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


@partial(jax.jit, static_argnums=(2, 3))
def sample(key: jax.Array, logits: jax.Array, s: Sampling, vocab_size: int | None = None) -> jax.Array:
    """Next token ids [b] from logits [b, V], never an id >= `vocab_size` (see `mask_vocab`)."""
    logits = mask_vocab(logits, vocab_size)
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def padded_length(n: int, unit: int) -> int:
    """n rounded up to a multiple of `unit` with at most 4 significant bits (in units): under 1/8 padding, and
    at most 8 lengths (compiled shapes) per doubling."""
    units = _round_up(n, unit) // unit
    return unit * _round_up(units, 1 << max(0, units.bit_length() - 4))


class Generator:
    """Jitted prefill and extend of one model (`params` on `mesh`)."""

    def __init__(self, params: dict, cfg: Config, mesh: Mesh):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.unit = 2 * mesh.shape["sp"] * PAD_UNIT
        outs = (replicated(mesh), replicated(mesh), cache_sharding(mesh))
        self._prefill = jax.jit(prefill, static_argnums=(3, 4, 5), out_shardings=outs)
        self._extend = jax.jit(extend, static_argnums=(4, 5), out_shardings=outs)
        self._batch_sharding = batch_shardings(mesh)

    def bucket(self, n: int) -> int:
        """The padded length used for a prompt of n tokens."""
        return padded_length(n, self.unit)

    def prefill(
        self, prompts: Sequence[tuple[np.ndarray, np.ndarray]], room: int
    ) -> tuple[np.ndarray, np.ndarray, KVCache]:
        """Prompts (ids, vision mask) -> text / vision logits [b, V] at their last tokens and a cache with at
        least `room` free slots after the longest prompt."""
        lengths = np.array([len(ids) for ids, _ in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        width = self.bucket(int(lengths.max()))
        tok = np.zeros((len(prompts), width), np.int32)
        vis = np.zeros((len(prompts), width), bool)
        seg = np.zeros((len(prompts), width), np.int32)
        for r, (ids, mask) in enumerate(prompts):
            tok[r, : lengths[r]], vis[r, : lengths[r]], seg[r, : lengths[r]] = ids, mask, 1
        pos = np.tile(np.arange(width, dtype=np.int32), (len(prompts), 1))
        batch = Batch(tok, vis, pos, seg, np.zeros_like(tok), vis, np.zeros(tok.shape, np.float32))
        max_len = _round_up(width + room, self.unit)
        batch = jax.device_put(batch, self._batch_sharding)
        text, vision, cache = self._prefill(self.params, batch, lengths, self.cfg, self.mesh, max_len)
        return np.asarray(text), np.asarray(vision), cache

    def extend(self, cache: KVCache, ids: np.ndarray, vision: np.ndarray):
        """Append ids [b, T] to the cache; text / vision logits [b, T, V] and the new cache."""
        free = cache.k.shape[2] - int(np.max(np.asarray(cache.length)))
        if ids.shape[1] > free:
            raise ValueError(f"the cache has {free} free slots, {ids.shape[1]} tokens were given")
        return self._extend(
            self.params, cache, jnp.asarray(ids, jnp.int32), jnp.asarray(vision, bool), self.cfg, self.mesh
        )

    def extend_chunked(self, cache: KVCache, ids: np.ndarray, vision: np.ndarray, chunk: int = 32):
        """`extend` in pieces of at most `chunk` tokens (attention memory grows with T x cache)."""
        outs_t, outs_v = [], []
        for a in range(0, ids.shape[1], chunk):
            text, vis_logits, cache = self.extend(cache, ids[:, a : a + chunk], vision[:, a : a + chunk])
            outs_t.append(np.asarray(text))
            outs_v.append(np.asarray(vis_logits))
        return np.concatenate(outs_t, axis=1), np.concatenate(outs_v, axis=1), cache


def generate_text(
    gen: Generator,
    cache: KVCache,
    logits: np.ndarray,
    max_new_tokens: int,
    eos_id: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Sample up to `max_new_tokens` text tokens per row, starting from the text `logits` [b, V] of each row's
    last token; a row stops at EOS (not included). Returns each row's new ids, all below `vocab_size` (the
    tokenizer's vocabulary; the model's may be padded beyond it)."""
    key = jax.random.key(seed)
    b = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    active = np.ones(b, bool)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        ids = np.asarray(sample(sub, jnp.asarray(logits), sampling, vocab_size))
        for r in np.flatnonzero(active):
            if ids[r] == eos_id:
                active[r] = False
            else:
                out[r].append(int(ids[r]))
                if on_token:
                    on_token(int(r), int(ids[r]))
        if not active.any():
            break
        text, _, cache = gen.extend(cache, ids[:, None], np.zeros((b, 1), bool))
        logits = text[:, 0]  # stays on device: only the sampled ids come to the host
    return out


def generate_vision(
    gen: Generator,
    cache: KVCache,
    logits: np.ndarray,
    frames: int,
    tokens_per_frame: int,
    n_codes: int,
    sampling: Sampling = Sampling(),
    guidance: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sample `frames` frames of codes from the vision `logits` [b, V] of each row's last prompt token.

    With `guidance` (classifier-free guidance scale), rows [0, b/2) are conditional prompts and rows
    [b/2, b) their unconditional twins: each pair samples one token from u + guidance * (c - u), which both
    rows then take. Returns codes [b or b/2, frames, tokens_per_frame]."""
    key = jax.random.key(seed)
    b = logits.shape[0]
    half = b // 2 if guidance is not None else b
    eof, eov = n_codes, n_codes + 1
    codes = np.zeros((half, frames, tokens_per_frame), np.int32)
    vision = np.ones((b, 1), bool)
    for f in range(frames):
        for i in range(tokens_per_frame):
            lg = jnp.asarray(logits)
            if guidance is not None:
                lg = lg[half:] + guidance * (lg[:half] - lg[half:])
            key, sub = jax.random.split(key)
            ids = np.asarray(sample(sub, lg, sampling, n_codes))  # codes only inside a frame
            codes[:, f, i] = ids
            step = np.concatenate([ids, ids]) if guidance is not None else ids
            _, vis_logits, cache = gen.extend(cache, step[:, None], vision)
            logits = vis_logits[:, 0]
        marker = np.full((b, 1), eov if f == frames - 1 else eof, np.int32)  # forced frame boundary
        _, vis_logits, cache = gen.extend(cache, marker, vision)
        logits = vis_logits[:, 0]
    return codes
