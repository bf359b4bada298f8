"""Training loader: pre-tokenized shards -> packed, sharded, resumable global batches.

Order of documents (all deterministic from `seed`):
- Shuffle, per source and epoch: the shard order is permuted, shards are grouped into windows of
  `shuffle_window` consecutive shards, and all records of a window are permuted together. (A window at a time
  keeps the cache small; `shuffle_window >= shards` is a full global permutation.)
- Mixing: document d of the stream comes from a source drawn with probability proportional to its weight (the
  draws are a fixed seeded sequence). With `epochs` set, a source that has used its epochs leaves the mixture;
  when all have, the last batch is padded and the iterator stops.

Packing (next-fit): documents fill sequence after sequence of `seq_len` positions. The next-token shift is done
per document: a document of n tokens fills n - 1 positions with inputs `tokens[:-1]`, targets `tokens[1:]`,
`target_vision_mask = vision_mask[1:]` and loss weights `loss_mask[1:]`, so nothing is predicted across
documents. Positions restart at 0 per document; segment ids count documents from 1 within a row; padding has
segment id 0, token 0, position 0 and loss 0. A document that does not fit the rest of a row starts the next.

Over-long documents (n - 1 > seq_len), policy `overlong`:
- "split" (default): cut into pieces of at most seq_len + 1 tokens, each cut at the last frame boundary (after
  an `<eof>`) that fits, or exactly at the limit when none does (text). Consecutive pieces overlap by one token,
  so every target is predicted exactly once; each piece is its own segment with positions from 0.
- "drop": skip the document (counted in `stats["dropped"]`).

Sharding: rows of a global batch `[batch_size, seq_len]` are sharded over ("dp", "fsdp") and the sequence over
"sp" (natural token order; the model applies its own ring layout). Every process plans the whole batch from the
shard indices alone (lengths, no token data), then reads token data only for the rows its devices hold, so
processes of one sequence-parallel group read the same documents and each keeps its columns; only the shards
those rows touch are fetched, into a bounded local cache, by a background thread `prefetch` batches ahead.

Checkpointing: `get_state()` is a small JSON-able dict (step, per-source epoch and position, draw count, the
unfinished document); `set_state()` on a fresh loader of the same config continues with exactly the batches an
uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import queue
import tempfile
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from lvm.batch import Batch, batch_shardings, zeros
from lvm.data_pipeline import storage
from lvm.data_pipeline.shards import Corpus, ShardData, frame_boundaries

_DRAW_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class Source:
    uri: str  # corpus folder or gs:// prefix written by `lvm pretokenize`
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    sources: tuple[Source, ...]
    seq_len: int
    batch_size: int  # global rows per batch
    seed: int = 0
    overlong: str = "split"  # or "drop"
    shuffle_window: int = 8  # shards whose records are shuffled together
    epochs: int | None = None  # None: endless
    prefetch: int = 2  # batches prepared ahead by the background thread
    cache_dir: str | None = None
    cache_bytes: int = 4 << 30
    shards_in_memory: int = 8

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ValueError("need at least one source")
        if any(s.weight <= 0 for s in self.sources):
            raise ValueError(f"source weights must be > 0, got {[s.weight for s in self.sources]}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if self.overlong not in ("split", "drop"):
            raise ValueError(f"overlong must be 'split' or 'drop', got {self.overlong!r}")
        if self.shuffle_window < 1 or self.prefetch < 1:
            raise ValueError("shuffle_window and prefetch must be >= 1")


# Planning: which pieces of which documents fill each row (metadata only) --------------------------------------


class _Order:
    """The shuffled record order of one source in one epoch: position -> (shard, record)."""

    def __init__(self, counts: np.ndarray, seed: int, source: int, epoch: int, window: int):
        self.counts = counts
        rng = np.random.default_rng([seed, source, epoch, 0])
        self.shard_order = rng.permutation(len(counts))
        self.windows = [self.shard_order[i : i + window] for i in range(0, len(counts), window)]
        self.window_ends = np.cumsum([counts[w].sum() for w in self.windows])
        self.key = (seed, source, epoch)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def size(self) -> int:
        return int(self.window_ends[-1]) if len(self.window_ends) else 0

    def __getitem__(self, pos: int) -> tuple[int, int]:
        w = int(np.searchsorted(self.window_ends, pos, side="right"))
        if self._cached is None or self._cached[0] != w:
            shards_w = self.windows[w]
            shard_of = np.repeat(shards_w, self.counts[shards_w])
            rec_of = np.concatenate([np.arange(self.counts[s]) for s in shards_w])
            perm = np.random.default_rng([*self.key, w + 1]).permutation(len(shard_of))
            self._cached = (w, shard_of[perm], rec_of[perm])
        start = int(self.window_ends[w - 1]) if w else 0
        _, shard_of, rec_of = self._cached
        return int(shard_of[pos - start]), int(rec_of[pos - start])


class Planner:
    """Deterministic document order and packing plan; its whole state is `state` (JSON-able)."""

    def __init__(self, cfg: LoaderConfig, corpora: list[Corpus]):
        self.cfg = cfg
        self.corpora = corpora
        self.counts = [np.array([len(s.lengths) for s in c.shards], np.int64) for c in corpora]
        weights = np.array([s.weight for s in cfg.sources], np.float64)
        self.probs = weights / weights.sum()
        self._orders: dict[int, _Order] = {}
        self._draws: tuple[int, np.ndarray] | None = None
        self._boundaries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.state = self.initial_state()

    def initial_state(self) -> dict[str, Any]:
        return {
            "step": 0,
            "draws": 0,
            "sources": [{"epoch": 0, "pos": 0} for _ in self.corpora],
            "pending": None,  # [source, shard, record, start] of a document not yet (fully) packed
            "dropped": 0,
            "done": False,
        }

    def _order(self, src: int) -> _Order:
        epoch = self.state["sources"][src]["epoch"]
        order = self._orders.get(src)
        if order is None or order.key[2] != epoch:
            order = self._orders[src] = _Order(
                self.counts[src], self.cfg.seed, src, epoch, self.cfg.shuffle_window
            )
        return order

    def _live(self, src: int) -> bool:
        s = self.state["sources"][src]
        return self.cfg.epochs is None or s["epoch"] < self.cfg.epochs

    def _draw(self) -> int | None:
        """The next source from the seeded mixture sequence (skipping finished sources)."""
        if not any(self._live(i) for i in range(len(self.corpora))):
            return None
        while True:
            d = self.state["draws"]
            block = d // _DRAW_BLOCK
            if self._draws is None or self._draws[0] != block:
                rng = np.random.default_rng([self.cfg.seed, 1 << 20, block])
                self._draws = (block, rng.choice(len(self.probs), _DRAW_BLOCK, p=self.probs))
            self.state["draws"] = d + 1
            src = int(self._draws[1][d % _DRAW_BLOCK])
            if self._live(src):
                return src

    def _next_document(self) -> list[int] | None:
        """[source, shard, record, start] of the next document (or remainder), or None when all are used."""
        if self.state["pending"] is not None:
            doc, self.state["pending"] = self.state["pending"], None
            return doc
        while True:
            src = self._draw()
            if src is None:
                return None
            order = self._order(src)
            s = self.state["sources"][src]
            if order.size == 0:
                raise ValueError(f"source {self.cfg.sources[src].uri} has no records")
            shard, rec = order[s["pos"]]
            s["pos"] += 1
            if s["pos"] >= order.size:
                s["epoch"], s["pos"] = s["epoch"] + 1, 0
            return [src, shard, rec, 0]

    def _boundaries_of(self, src: int, shard: int, rec: int) -> np.ndarray:
        key = (src, shard, rec)
        if key not in self._boundaries:
            runs = self.corpora[src].shards[shard].vision_runs[rec]
            self._boundaries[key] = frame_boundaries(runs)
            if len(self._boundaries) > 64:
                self._boundaries.popitem(last=False)
        return self._boundaries[key]

    def _piece(self, doc: list[int]) -> tuple[int, int] | None:
        """[a, b) of the next piece of `doc`, or None to drop it (policy "drop")."""
        src, shard, rec, a = doc
        n = int(self.corpora[src].shards[shard].lengths[rec])
        limit = self.cfg.seq_len + 1  # tokens that fit one row (n tokens fill n - 1 positions)
        if n - a <= limit:
            return a, n
        if self.cfg.overlong == "drop":
            return None
        cuts = self._boundaries_of(src, shard, rec)
        ok = cuts[(cuts >= a + 2) & (cuts <= a + limit)]
        return a, int(ok[-1]) if len(ok) else a + limit

    def plan_batch(self) -> list[list[tuple[int, int, int, int, int]]] | None:
        """Pieces `(source, shard, record, a, b)` of every row of the next batch; None after the last batch."""
        if self.state["done"]:
            return None
        rows, any_piece = [], False
        for _ in range(self.cfg.batch_size):
            row, space = [], self.cfg.seq_len
            while space > 0:
                doc = self._next_document()
                if doc is None:
                    self.state["done"] = True
                    break
                piece = self._piece(doc)
                if piece is None:
                    self.state["dropped"] += 1
                    continue
                a, b = piece
                if b - a < 2:  # a one-token document predicts nothing
                    continue
                if b - a - 1 > space:
                    self.state["pending"] = doc
                    break
                row.append((doc[0], doc[1], doc[2], a, b))
                space -= b - a - 1
                any_piece = True
                if b < int(self.corpora[doc[0]].shards[doc[1]].lengths[doc[2]]):
                    self.state["pending"] = [doc[0], doc[1], doc[2], b - 1]  # the rest, one token overlap
            rows.append(row)
            if self.state["done"]:
                rows += [[] for _ in range(self.cfg.batch_size - len(rows))]
                break
        if not any_piece:
            return None
        self.state["step"] += 1
        return rows


# Assembling rows from token data ------------------------------------------------------------------------------


def pack_row(pieces, records, seq_len: int) -> Batch:
    """One row `[seq_len]` per field from pieces `(.., a, b)` and their `TokenRecord`s (see module docstring)."""
    out = zeros((seq_len,))
    pos = 0
    for seg, ((*_, a, b), rec) in enumerate(zip(pieces, records, strict=True), start=1):
        n = b - a - 1
        sl = slice(pos, pos + n)
        out.tokens[sl] = rec.tokens[a : b - 1]
        out.vision_mask[sl] = rec.vision_mask[a : b - 1]
        out.targets[sl] = rec.tokens[a + 1 : b]
        out.target_vision_mask[sl] = rec.vision_mask[a + 1 : b]
        out.loss_mask[sl] = rec.loss_mask[a + 1 : b]
        out.positions[sl] = np.arange(n)
        out.segment_ids[sl] = seg
        pos += n
    return out


class Loader:
    """Iterator of global `Batch`es of jax Arrays `[batch_size, seq_len]`, sharded as `lvm.batch` says on `mesh`."""

    def __init__(self, cfg: LoaderConfig, mesh):
        self.cfg = cfg
        self.corpora = [Corpus.open(s.uri) for s in cfg.sources]
        self.sharding = batch_shardings(mesh).tokens  # every field is sharded alike
        self.shape = (cfg.batch_size, cfg.seq_len)
        index_map = self.sharding.addressable_devices_indices_map(self.shape)
        rows: set[int] = set()
        for idx in index_map.values():
            rows.update(range(*idx[0].indices(cfg.batch_size)))
        self.local_rows = sorted(rows)  # rows this process's devices hold
        self.cache = storage.FileCache(
            cfg.cache_dir or tempfile.mkdtemp(prefix="lvm-shards-"), max_bytes=cfg.cache_bytes
        )
        self._loaded: OrderedDict[str, ShardData] = OrderedDict()
        self._planner = Planner(cfg, self.corpora)
        self._state = self._planner.state.copy()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self.stats = {"shards_read": set()}

    # State ------------------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-able position after the last batch returned."""
        state = _copy(self._state)
        state["config"] = self._fingerprint()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `get_state()`'s output (of a loader with the same sources, sizes and seed)."""
        if state.get("config") != self._fingerprint():
            raise ValueError(
                f"loader state was saved for {state.get('config')}, this loader is {self._fingerprint()}"
            )
        self._halt()
        self._planner = Planner(self.cfg, self.corpora)
        self._planner.state = _copy({k: v for k, v in state.items() if k != "config"})
        self._state = _copy(self._planner.state)

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "sources": [[s.uri, s.weight] for s in c.sources],
            "seq_len": c.seq_len,
            "batch_size": c.batch_size,
            "seed": c.seed,
            "overlong": c.overlong,
            "shuffle_window": c.shuffle_window,
            "epochs": c.epochs,
        }

    # Iteration --------------------------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        import jax

        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._halt()
            raise item
        if item is None:
            self._halt()
            raise StopIteration
        local, state = item
        self._state = state

        def make(name):
            def cb(index):
                r = range(*index[0].indices(self.cfg.batch_size))
                return np.stack([getattr(local[i], name)[index[1]] for i in r])

            return jax.make_array_from_callback(self.shape, self.sharding, cb)

        return Batch(*(make(name) for name in Batch._fields))

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(target=self._produce, name="lvm-loader", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = self._queue = None

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                rows = self._planner.plan_batch()
                if rows is None:
                    self._put(None)
                    return
                state = _copy(self._planner.state)
                local = {r: self._assemble(rows[r]) for r in self.local_rows}
                if not self._put((local, state)):
                    return
        except BaseException as err:  # surfaced in __next__
            self._put(err)

    def _assemble(self, pieces) -> Batch:
        records = []
        for src, shard, rec, _, _ in pieces:
            records.append(self._shard(src, shard).record(rec))
        return pack_row(pieces, records, self.cfg.seq_len)

    def _shard(self, src: int, shard: int) -> ShardData:
        uri = self.corpora[src].shards[shard].uri
        if uri not in self._loaded:
            self.stats["shards_read"].add((src, shard))
            path = self.cache.fetch(uri, pin=True)
            try:
                self._loaded[uri] = ShardData.load(path)
            finally:
                self.cache.release(uri)
            if len(self._loaded) > self.cfg.shards_in_memory:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(uri)
        return self._loaded[uri]

    def close(self) -> None:
        self._halt()


def _copy(state: dict) -> dict:
    import copy

    return copy.deepcopy(state)
