"""Autoregressive generation over a sequence-sharded KV cache: sampling, text decoding, vision decoding.

`Generator` holds one model on one mesh and jits `prefill` (ring attention over sp, so a prompt longer than one
device's memory works), `extend` (new tokens against the cache), `append` (each row's own number of new
tokens, padded) and the decode loops. Prompt lengths and cache sizes are padded to buckets (multiples of
`2 * sp * 64` with at most 4 significant bits: under 1/8 padding) so few shapes compile, whatever the prompt
lengths and generation budgets of the requests.

The decode loops run on the device:
- Text (`TextDecoder`, `generate_text`): one jitted `lax.while_loop` samples up to `chunk` tokens per call
  (greedy / temperature / top-k / top-p, per row; the padded vocabulary rows beyond the tokenizer's
  `vocab_size` masked), appends them to the cache and stops each row at EOS or its budget, leaving the loop
  early once every row has stopped. The host only loops over chunks, streaming each chunk's tokens. A row's
  random key is its seed with its token index folded in, so seeded sampling is reproducible and a row gets
  the same tokens in a batch as alone.
- Vision (`VisionDecoder`, `generate_vision`): one jitted call per frame samples its `tokens_per_frame` codes
  (`lax.scan`) and appends the forced `<eof>` (`<eov>` after the last frame); classifier-free guidance
  combines each conditional / unconditional pair of rows in the graph. The next frame is dispatched before the
  current one is handed over, so the device keeps working while the caller decodes pixels.

`host_generate_text` / `host_generate_vision` are the host-driven loops the device loops replaced (one
dispatch and host round trip per token): the benchmark's baseline and the tests' reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from lvm.batch import Batch, batch_shardings
from lvm.config import Config
from lvm.model import KVCache, cache_sharding, extend, prefill
from lvm.sharding import replicated

PAD_UNIT = 64  # prompt buckets are multiples of 2 * sp * PAD_UNIT tokens
DEFAULT_CHUNK = 16  # text tokens sampled per jitted call
APPEND_CHUNK = 32  # tokens per `append` call (attention memory grows with new tokens x cache)
APPEND_STEP = 8  # the last `append` call is padded to a multiple of this many tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


class Knobs(NamedTuple):
    """Sampling settings per row, as arrays (traced: a new setting compiles nothing)."""

    temperature: jax.Array  # [b] float32
    top_k: jax.Array  # [b] int32
    top_p: jax.Array  # [b] float32


def knobs(sampling: Sampling | Sequence[Sampling], rows: int) -> Knobs:
    """`Knobs` of `rows` rows: one `Sampling` for all of them, or one per row."""
    per_row = [sampling] * rows if isinstance(sampling, Sampling) else list(sampling)
    if len(per_row) != rows:
        raise ValueError(f"{len(per_row)} sampling settings for {rows} rows")
    return Knobs(
        np.array([s.temperature for s in per_row], np.float32),
        np.array([s.top_k for s in per_row], np.int32),
        np.array([s.top_p for s in per_row], np.float32),
    )


def _filter(logits: jax.Array, k: Knobs) -> jax.Array:
    """Float32 logits [b, V] scaled by each row's temperature, -inf outside its top-k and top-p nucleus."""
    logits = logits.astype(jnp.float32) / jnp.maximum(k.temperature, 1e-6)[:, None]
    order = jnp.sort(logits, axis=-1)[:, ::-1]
    v = logits.shape[-1]
    top = jnp.where(k.top_k > 0, jnp.minimum(k.top_k, v), v)
    kth = jnp.take_along_axis(order, (top - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.where(order < kth, -jnp.inf, order)  # the sorted top-k survivors
    probs = jax.nn.softmax(order, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    cutoff = jnp.min(jnp.where(before < k.top_p[:, None], order, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.where(k.top_p[:, None] < 1, cutoff, -jnp.inf)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Float32 logits [b, V] scaled by the temperature, -inf outside the top-k and the top-p nucleus."""
    return _filter(logits, knobs(s, logits.shape[0]))


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
    """Next token ids [b] from logits [b, V], never an id >= `vocab_size` (see `mask_vocab`); one key for the
    whole batch (the host loops' sampler)."""
    logits = mask_vocab(logits, vocab_size)
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)


def row_keys(seeds: jax.Array, index: jax.Array) -> jax.Array:
    """Each row's key for its token `index`: its seed's key with the index folded in."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, index)


def pick(
    seeds: jax.Array, index: jax.Array, logits: jax.Array, k: Knobs, vocab_size: int | None
) -> jax.Array:
    """Next token ids [b] from logits [b, V] with per-row settings, never an id >= `vocab_size`: greedy rows
    take the argmax, the others draw with their key for token `index` (`row_keys`). The keys and the sort
    behind top-k / top-p are computed only when some row samples."""
    logits = mask_vocab(logits.astype(jnp.float32), vocab_size)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        keys = row_keys(seeds, index)
        drawn = jax.vmap(jax.random.categorical)(keys, _filter(logits, k)).astype(jnp.int32)
        return jnp.where(k.temperature > 0, drawn, greedy)

    return lax.cond(jnp.any(k.temperature > 0), sampled, lambda: greedy)


def row_seeds(seed: int | Sequence[int], rows: int) -> np.ndarray:
    """uint32 seeds per row: `seed + r` for row r of an int, else one seed per row (mod 2**32)."""
    seeds = np.arange(rows) + seed if isinstance(seed, int | np.integer) else np.asarray(seed)
    if seeds.shape != (rows,):
        raise ValueError(f"{seeds.size} seeds for {rows} rows")
    return (seeds.astype(np.int64) % (1 << 32)).astype(np.uint32)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def padded_length(n: int, unit: int) -> int:
    """n rounded up to a multiple of `unit` with at most 4 significant bits (in units): under 1/8 padding, and
    at most 8 lengths (compiled shapes) per doubling."""
    units = _round_up(n, unit) // unit
    return unit * _round_up(units, 1 << max(0, units.bit_length() - 4))


# ----------------------------------------------------------------------------------------------------------
# The jitted bodies


class TextState(NamedTuple):
    """Where a batch of text rows stands between decode chunks (all on the device)."""

    cache: KVCache
    logits: jax.Array  # [b, V] float32: text logits of each row's last token
    seeds: jax.Array  # [b] uint32
    knobs: Knobs
    count: jax.Array  # [b] int32: tokens sampled so far (EOS included)
    limit: jax.Array  # [b] int32: tokens a row may sample
    done: jax.Array  # [b] bool: stopped at EOS or its limit
    eos: jax.Array  # [] int32
    forced: jax.Array  # [b] int32: the next token, already picked by `text_start` (-1: sample it)


class VisionState(NamedTuple):
    """Where a batch of vision rows stands between frames (all on the device)."""

    cache: KVCache
    logits: jax.Array  # [b, V] float32: vision logits of each row's last token
    seeds: jax.Array  # [g] uint32, one per sampled row (per pair with guidance)
    knobs: Knobs  # [g] each
    count: jax.Array  # [] int32: codes sampled so far per row
    guidance: jax.Array  # [] float32 (unused without guidance)


def text_chunk(
    params: dict, s: TextState, steps: jax.Array, cfg: Config, mesh: Mesh, vocab_size: int | None, chunk: int
) -> tuple[TextState, jax.Array]:
    """Up to `steps` (<= `chunk`) decode steps of every row, fewer once all rows are done. A step samples each
    row's next token (or takes the one `text_start` picked), appends it to the cache (an active row's cache
    grows by it, EOS included; a stopped row's does not) and computes the next logits. Returns the new state
    and the ids [b, chunk] each row emitted (-1: none, the EOS, or the step did not run)."""
    b = s.logits.shape[0]
    no_vision = jnp.zeros((b, 1), bool)

    def step(carry):
        j, s, out = carry
        active = ~s.done
        ids = pick(s.seeds, s.count, s.logits, s.knobs, vocab_size)
        ids = jnp.where(s.forced >= 0, s.forced, ids)
        stop = ids == s.eos
        out = out.at[:, j].set(jnp.where(active & ~stop, ids, -1))
        text, _, cache = extend(params, s.cache, ids[:, None], no_vision, cfg, mesh)
        grown = active.astype(jnp.int32)
        count = s.count + grown
        s = s._replace(
            cache=cache._replace(length=s.cache.length + grown),
            logits=text[:, 0],
            count=count,
            done=s.done | stop | (count >= s.limit),
            forced=jnp.full_like(s.forced, -1),
        )
        return j + 1, s, out

    def more(carry):
        j, s, _ = carry
        return (j < steps) & ~jnp.all(s.done)

    out = jnp.full((b, chunk), -1, jnp.int32)
    _, s, out = lax.while_loop(more, step, (jnp.int32(0), s, out))
    return s, out


def text_start(
    logits: jax.Array, ints: jax.Array, floats: jax.Array, vocab_size: int | None
) -> tuple[TextState, jax.Array]:
    """The state before decoding from each row's last text `logits` [b, V] (its cache left out: the caller
    adds it, so it is not copied) and each row's first token [b], picked as the first `text_chunk` step would
    (which then takes it): a first token without a decode step. Per row, `ints` [b, 4] holds the seed (bits of
    a uint32), top_k, the token limit and the EOS id, `floats` [b, 2] temperature and top_p (two transfers)."""
    seeds = lax.bitcast_convert_type(ints[:, 0], jnp.uint32)
    k = Knobs(floats[:, 0], ints[:, 1], floats[:, 1])
    limit, eos = ints[:, 2], ints[0, 3]
    count = jnp.zeros(limit.shape, jnp.int32)
    logits = logits.astype(jnp.float32)
    ids = pick(seeds, count, logits, k, vocab_size)
    return TextState(None, logits, seeds, k, count, limit, limit <= 0, eos, ids), ids


def vision_frame(
    params: dict,
    s: VisionState,
    marker: jax.Array,
    cfg: Config,
    mesh: Mesh,
    n_codes: int,
    codes: int,
    guided: bool,
) -> tuple[VisionState, jax.Array]:
    """One frame: `codes` sampled codes per row (ids < n_codes), then `marker` (<eof> / <eov>) appended to
    every row. With `guided`, rows [0, b/2) are conditional and [b/2, b) their unconditional twins: each pair
    samples from u + guidance * (c - u) and both rows take the code. Returns the state and codes [g, codes]."""
    b = s.logits.shape[0]
    vision = jnp.ones((b, 1), bool)

    def code(s, _):
        lg = s.logits
        if guided:
            c, u = lg[: b // 2], lg[b // 2 :]
            lg = u + s.guidance * (c - u)
        ids = pick(s.seeds, jnp.full(s.seeds.shape, s.count), lg, s.knobs, n_codes)
        both = jnp.concatenate([ids, ids]) if guided else ids
        _, vis, cache = extend(params, s.cache, both[:, None], vision, cfg, mesh)
        return s._replace(cache=cache, logits=vis[:, 0], count=s.count + 1), ids

    s, ids = lax.scan(code, s, None, length=codes)
    _, vis, cache = extend(params, s.cache, jnp.full((b, 1), marker, jnp.int32), vision, cfg, mesh)
    return s._replace(cache=cache, logits=vis[:, 0]), ids.T


def append_chunk(
    params: dict,
    cache: KVCache,
    ids: jax.Array,
    vision: jax.Array,
    counts: jax.Array,
    last: tuple[jax.Array, jax.Array],
    cfg: Config,
    mesh: Mesh,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Append row r's first counts[r] tokens of ids [b, C] (the rest is padding, written past the row's new
    length where nothing attends to it and later tokens overwrite it). Returns the text and vision logits
    [b, V] at each row's last appended token (`last`'s rows where counts is 0) and the cache."""
    text, vis, new = extend(params, cache, ids, vision, cfg, mesh)
    at = jnp.maximum(counts - 1, 0)[:, None, None]
    has = (counts > 0)[:, None]
    logits = tuple(
        jnp.where(has, jnp.take_along_axis(x, at, axis=1)[:, 0], prev)
        for x, prev in zip((text, vis), last, strict=True)
    )
    return *logits, new._replace(length=cache.length + counts)


# ----------------------------------------------------------------------------------------------------------
# The generator


class Generator:
    """Jitted prefill, extend, append and decode loops of one model (`params` on `mesh`)."""

    def __init__(self, params: dict, cfg: Config, mesh: Mesh):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.unit = 2 * mesh.shape["sp"] * PAD_UNIT
        rep, cache = replicated(mesh), cache_sharding(mesh)
        outs = (rep, rep, cache)
        self._prefill = jax.jit(prefill, static_argnums=(3, 4, 5), out_shardings=outs)
        self._extend = jax.jit(extend, static_argnums=(4, 5), out_shardings=outs)
        self._append = jax.jit(append_chunk, static_argnums=(6, 7), out_shardings=outs)
        k = Knobs(rep, rep, rep)
        text = TextState(cache, rep, rep, k, rep, rep, rep, rep, rep)
        self._text_chunk = jax.jit(text_chunk, static_argnums=(3, 4, 5, 6), out_shardings=(text, rep))
        self._text_start = jax.jit(
            text_start, static_argnums=(3,), out_shardings=(text._replace(cache=None), rep)
        )
        vision = VisionState(cache, rep, rep, k, rep, rep)
        self._frame = jax.jit(vision_frame, static_argnums=(3, 4, 5, 6, 7), out_shardings=(vision, rep))
        self._batch_sharding = batch_shardings(mesh)
        self._rep = rep
        self._zeros: dict[int, tuple[jax.Array, jax.Array]] = {}

    def jitted(self) -> dict[str, Callable]:
        """The jitted functions by name (their `_cache_size()` counts the shapes compiled)."""
        return {
            "prefill": self._prefill,
            "extend": self._extend,
            "append": self._append,
            "text_chunk": self._text_chunk,
            "text_start": self._text_start,
            "vision_frame": self._frame,
        }

    def bucket(self, n: int) -> int:
        """The padded length used for a prompt of n tokens."""
        return padded_length(n, self.unit)

    def prefill(
        self, prompts: Sequence[tuple[np.ndarray, np.ndarray]], room: int
    ) -> tuple[np.ndarray, np.ndarray, KVCache]:
        """Prompts (ids, vision mask) -> text / vision logits [b, V] at their last tokens and a cache with at
        least `room` free slots after the longest prompt (its size bucketed like the prompt's)."""
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
        max_len = padded_length(width + room, self.unit)
        batch = jax.device_put(batch, self._batch_sharding)
        text, vision, cache = self._prefill(self.params, batch, lengths, self.cfg, self.mesh, max_len)
        return np.asarray(text), np.asarray(vision), cache

    def extend(self, cache: KVCache, ids: np.ndarray, vision: np.ndarray):
        """Append ids [b, T] to the cache; text / vision logits [b, T, V] and the new cache."""
        _check_room(cache, ids.shape[1], "tokens were given")
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

    def _no_logits(self, b: int) -> tuple[jax.Array, jax.Array]:
        """Zero text and vision logits [b, V] on the devices (made once per batch size)."""
        if b not in self._zeros:
            m = self.cfg.model
            zeros = lambda v: np.zeros((b, v), np.float32)
            self._zeros[b] = jax.device_put((zeros(m.text_vocab_size), zeros(m.vision_vocab_size)), self._rep)
        return self._zeros[b]

    def append(
        self, cache: KVCache, rows: Sequence[tuple[np.ndarray, np.ndarray]], chunk: int = APPEND_CHUNK
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """Append each row's own tokens (ids, vision mask; at least one per row, any number) to the cache:
        text / vision logits [b, V] at each row's last new token (on the device) and the new cache. Calls of
        `chunk` tokens each, the last padded to a multiple of `APPEND_STEP`, so at most chunk / APPEND_STEP
        shapes compile whatever the lengths (`extend_chunked` compiles one per remainder)."""
        counts = np.array([len(ids) for ids, _ in rows], np.int32)
        if len(counts) != cache.length.shape[0] or counts.min() < 1:
            raise ValueError(
                f"need one row of at least one token per cache row, got lengths {counts.tolist()}"
            )
        _check_room(cache, counts, "tokens were given")
        width = _round_up(int(counts.max()), chunk)
        ids = np.zeros((len(rows), width), np.int32)
        vis = np.zeros((len(rows), width), bool)
        for r, (i, v) in enumerate(rows):
            ids[r, : counts[r]], vis[r, : counts[r]] = i, v
        last = self._no_logits(len(rows))
        longest = int(counts.max())
        for a in range(0, longest, chunk):
            size = min(chunk, _round_up(longest - a, APPEND_STEP))  # the last call: a multiple of APPEND_STEP
            n = np.clip(counts - a, 0, size).astype(np.int32)
            text, vision, cache = self._append(
                self.params, cache, ids[:, a : a + size], vis[:, a : a + size], n, last, self.cfg, self.mesh
            )
            last = (text, vision)
        return text, vision, cache

    def start_text(
        self, cache, logits, max_new_tokens, eos_id, sampling=Sampling(), seed=0, vocab_size=None
    ) -> tuple[TextState, jax.Array]:
        """The state before decoding text from each row's last text `logits` [b, V] and `cache` (`text_chunk`),
        and each row's first token [b] (on the device; the first step takes it). The arguments are
        `TextDecoder`'s."""
        b = logits.shape[0]
        limit = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,)).copy()
        _check_room(cache, limit, "new tokens were asked for")
        k = knobs(sampling, b)
        ints = np.stack([row_seeds(seed, b).view(np.int32), k.top_k, limit, np.full(b, eos_id, np.int32)], 1)
        state, first = self._text_start(logits, ints, np.stack([k.temperature, k.top_p], 1), vocab_size)
        return state._replace(cache=cache), first

    def text_chunk(self, state: TextState, steps: int, chunk: int, vocab_size: int | None = None):
        """Up to `steps` decode steps on the device (`text_chunk`): the new state and ids [b, chunk]."""
        return self._text_chunk(self.params, state, np.int32(steps), self.cfg, self.mesh, vocab_size, chunk)

    def vision_state(
        self,
        cache: KVCache,
        logits,
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        guidance: float | None = None,
        seed: int | Sequence[int] = 0,
    ) -> VisionState:
        """The state before decoding frames from each row's last vision `logits` [b, V] (`vision_frame`)."""
        b = logits.shape[0]
        if guidance is not None and b % 2:
            raise ValueError(f"guidance needs pairs of conditional and unconditional rows, got {b} rows")
        g = b // 2 if guidance is not None else b
        state = VisionState(
            None, logits, row_seeds(seed, g), knobs(sampling, g), np.int32(0), np.float32(guidance or 0.0)
        )
        return jax.device_put(state, self._rep)._replace(cache=cache)

    def vision_frame(self, state: VisionState, marker: int, n_codes: int, codes: int, guided: bool):
        """One frame on the device (`vision_frame`): the new state and codes [g, codes]."""
        return self._frame(self.params, state, np.int32(marker), self.cfg, self.mesh, n_codes, codes, guided)


def _check_room(cache: KVCache, need, what: str) -> None:
    free = cache.k.shape[2] - np.asarray(cache.length)
    if np.any(free < need):
        raise ValueError(f"the cache has {int(free.min())} free slots, {int(np.max(need))} {what}")


# ----------------------------------------------------------------------------------------------------------
# Decoding from the host: chunks of text, frames of codes


class TextDecoder:
    """Text decoding in jitted chunks: iterate to get each chunk's new ids per row as it is produced.

    Starts from the text `logits` [b, V] of each row's last token and its `cache`; a row stops at `eos_id`
    (not emitted, but appended to its cache) or after `max_new_tokens` (an int, or one per row). Each call
    runs `chunk` decode steps on the device. With `peek` the first token comes alone, picked without a decode
    step (time to first token: one small dispatch). After (or during) the iteration, `tokens` holds each
    row's ids so far, `done` which rows stopped and `state.cache` the cache holding every row's prompt and
    tokens (ready for a next turn)."""

    def __init__(
        self,
        gen: Generator,
        cache: KVCache,
        logits,
        max_new_tokens: int | Sequence[int],
        eos_id: int,
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        seed: int | Sequence[int] = 0,
        vocab_size: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        peek: bool = True,
    ):
        if chunk < 1:
            raise ValueError(f"the chunk must be at least 1 token, got {chunk}")
        self.gen, self.chunk, self.peek, self.vocab_size, self.eos_id = gen, chunk, peek, vocab_size, eos_id
        self.state, self.first = gen.start_text(
            cache, logits, max_new_tokens, eos_id, sampling, seed, vocab_size
        )
        b = logits.shape[0]
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.done = np.broadcast_to(np.asarray(max_new_tokens), (b,)) <= 0

    def _take(self, ids: np.ndarray) -> list[list[int]]:
        new = [[int(t) for t in row if t >= 0] for row in ids]
        for row, add in zip(self.tokens, new, strict=True):
            row.extend(add)
        return new

    def __iter__(self) -> Iterator[list[list[int]]]:
        skip = 0
        if self.peek and not self.done.all():
            ids = np.asarray(self.first)
            yield self._take(np.where(self.done | (ids == self.eos_id), -1, ids)[:, None])
            skip = 1  # the next chunk's first step takes (and emits) the peeked tokens
        while not self.done.all():
            self.state, ids = self.gen.text_chunk(self.state, self.chunk, self.chunk, self.vocab_size)
            ids, self.done = np.asarray(ids)[:, skip:], np.asarray(self.state.done)
            skip = 0
            yield self._take(ids)

    def run(self) -> list[list[int]]:
        """Decode to the end; each row's ids."""
        for _ in self:
            pass
        return self.tokens


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
    chunk: int = DEFAULT_CHUNK,
) -> list[list[int]]:
    """Sample up to `max_new_tokens` text tokens per row on the device (`TextDecoder`), starting from the text
    `logits` [b, V] of each row's last token; a row stops at EOS (not included). Returns each row's new ids,
    all below `vocab_size` (the tokenizer's vocabulary; the model's may be padded beyond it). `on_token(row,
    id)` gets each token, a chunk at a time (the first token alone)."""
    peek = on_token is not None  # a quick first token only matters to a streaming caller
    decoder = TextDecoder(gen, cache, logits, max_new_tokens, eos_id, sampling, seed, vocab_size, chunk, peek)
    for new in decoder:
        if on_token:
            for step in range(max(map(len, new), default=0)):
                for r, row in enumerate(new):
                    if step < len(row):
                        on_token(r, row[step])
    return decoder.tokens


class VisionDecoder:
    """Frames of codes, one jitted call each: iterate to get each frame's codes [g, tokens_per_frame] (g rows,
    the conditional ones with guidance) as it is produced; the next frame is already dispatched then."""

    def __init__(
        self,
        gen: Generator,
        cache: KVCache,
        logits,
        frames: int,
        tokens_per_frame: int,
        n_codes: int,
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        guidance: float | None = None,
        seed: int | Sequence[int] = 0,
    ):
        _check_room(cache, frames * (tokens_per_frame + 1), "frame tokens were asked for")
        self.gen, self.frames, self.per_frame, self.n_codes = gen, frames, tokens_per_frame, n_codes
        self.guided = guidance is not None
        self.state = gen.vision_state(cache, logits, sampling, guidance, seed)

    def _frame(self, f: int):
        marker = (
            self.n_codes + 1 if f == self.frames - 1 else self.n_codes
        )  # <eov> after the last, else <eof>
        self.state, codes = self.gen.vision_frame(
            self.state, marker, self.n_codes, self.per_frame, self.guided
        )
        return codes

    def __iter__(self) -> Iterator[np.ndarray]:
        pending = self._frame(0) if self.frames else None
        for f in range(self.frames):
            codes = pending
            if f + 1 < self.frames:
                pending = self._frame(f + 1)  # the device works on the next frame while this one is used
            yield np.asarray(codes)


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
    """Sample `frames` frames of codes from the vision `logits` [b, V] of each row's last prompt token, a frame
    per jitted call (`VisionDecoder`).

    With `guidance` (classifier-free guidance scale), rows [0, b/2) are conditional prompts and rows
    [b/2, b) their unconditional twins: each pair samples one token from u + guidance * (c - u), which both
    rows then take. Returns codes [b or b/2, frames, tokens_per_frame]."""
    decoder = VisionDecoder(gen, cache, logits, frames, tokens_per_frame, n_codes, sampling, guidance, seed)
    out = list(decoder)
    g = logits.shape[0] // 2 if guidance is not None else logits.shape[0]
    return np.stack(out, axis=1) if out else np.zeros((g, 0, tokens_per_frame), np.int32)


# ----------------------------------------------------------------------------------------------------------
# The host-driven loops (the benchmark's baseline, the tests' reference)


def host_generate_text(
    gen, cache, logits, max_new_tokens, eos_id, sampling=Sampling(), seed=0, on_token=None, vocab_size=None
) -> list[list[int]]:
    """`generate_text` (same arguments) driven from Python: one `sample` and one `extend` dispatch per token,
    the ids brought to the host each time (one key for the whole batch, split per step)."""
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


def host_generate_vision(
    gen, cache, logits, frames, tokens_per_frame, n_codes, sampling=Sampling(), guidance=None, seed=0
) -> np.ndarray:
    """`generate_vision` (same arguments) driven from Python: one `sample` and one `extend` dispatch per
    code."""
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
