"""The pre-tokenized corpus on disk or `gs://`: shards of token records, an index per shard, a corpus header.

Layout of a corpus folder (local path or `gs://bucket/prefix`):

    dataset.json                        format, shard count, vocabularies, how the videos were sampled
    shard-00000-of-00004.npz            records of manifest lines [0, S), uncompressed npz:
                                          tokens int32 [N], vision_mask bool [N], loss_mask float32 [N],
                                          offsets int64 [records + 1] (record r is [offsets[r], offsets[r+1]))
    shard-00000-of-00004.json           the shard's index: record lengths, ids, video layout, failures
    ...
    errors.jsonl                        one JSON line per input that failed (see `lvm.data_pipeline.pretokenize`)

A shard's `.npz` is written first and its `.json` index second, each atomically, so a shard counts as finished
exactly when its index exists; a crash in between leaves an npz that the next run overwrites. The index keeps
what the loader plans with, without reading token data: each record's length and its videos as
`[start, frames, tokens_per_frame]` runs (frame boundaries, for splitting over-long examples between frames).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from lvm.data_pipeline import storage
from lvm.tokenizers.format import TokenRecord, VisionVocab

FORMAT = "lvm-token-shards-v1"
HEADER = "dataset.json"


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}"


def vision_runs(record: TokenRecord, vocab: VisionVocab) -> list[list[int]]:
    """`[start, frames, tokens_per_frame]` of each video in a record (frames end with `<eof>`/`<eov>`)."""
    v = np.asarray(record.vision_mask, bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], v.astype(np.int8), [0]])))
    runs = []
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        ids = record.tokens[start:end]
        frames = int(np.count_nonzero((ids == vocab.eof) | (ids == vocab.eov)))
        runs.append([int(start), frames, int((end - start) // max(frames, 1))])
    return runs


def frame_boundaries(runs: list[list[int]]) -> np.ndarray:
    """Token positions right after each `<eof>` (a cut there keeps whole frames on both sides)."""
    cuts = [start + per * np.arange(1, frames) for start, frames, per in runs]
    return np.concatenate(cuts).astype(np.int64) if cuts else np.zeros(0, np.int64)


def encode_shard(records: list[TokenRecord]) -> bytes:
    """The `.npz` bytes of a shard."""
    lengths = np.array([len(r) for r in records], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def cat(field, dtype):
        parts = [np.asarray(getattr(r, field), dtype) for r in records]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    buf = io.BytesIO()
    np.savez(
        buf,
        tokens=cat("tokens", np.int32),
        vision_mask=cat("vision_mask", bool),
        loss_mask=cat("loss_mask", np.float32),
        offsets=offsets,
    )
    return buf.getvalue()


def write_shard(
    folder: str,
    k: int,
    n: int,
    records: list[TokenRecord],
    ids: list[str],
    vocab: VisionVocab,
    failures: list[dict],
) -> dict:
    """Write shard k of n (data, then index) and return its index."""
    name = shard_name(k, n)
    storage.write_bytes(storage.join(folder, name + ".npz"), encode_shard(records))
    index = {
        "shard": k,
        "records": len(records),
        "tokens": int(sum(len(r) for r in records)),
        "lengths": [len(r) for r in records],
        "ids": ids,
        "vision_runs": [vision_runs(r, vocab) for r in records],
        "failures": failures,
    }
    storage.write_json(storage.join(folder, name + ".json"), index)
    return index


@dataclasses.dataclass
class ShardData:
    """One shard's arrays in memory; `record(i)` gives views of record i."""

    tokens: np.ndarray
    vision_mask: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    @classmethod
    def load(cls, path: str) -> ShardData:
        with np.load(path) as z:
            return cls(z["tokens"], z["vision_mask"], z["loss_mask"], z["offsets"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, i: int) -> TokenRecord:
        a, b = self.offsets[i], self.offsets[i + 1]
        return TokenRecord(self.tokens[a:b], self.vision_mask[a:b], self.loss_mask[a:b])


@dataclasses.dataclass
class ShardIndex:
    uri: str  # the shard's .npz
    lengths: np.ndarray  # int64 [records]
    vision_runs: list
    ids: list[str]


@dataclasses.dataclass
class Corpus:
    """A finished corpus: its header and every shard's index (no token data is read)."""

    uri: str
    header: dict
    shards: list[ShardIndex]

    @classmethod
    def open(cls, uri: str) -> Corpus:
        header_uri = storage.join(uri, HEADER)
        if not storage.exists(header_uri):
            raise FileNotFoundError(f"no pre-tokenized corpus at {uri} (no {HEADER}); run `lvm pretokenize`")
        header = json.loads(storage.read_text(header_uri))
        if header.get("format") != FORMAT:
            raise ValueError(f"{header_uri}: format {header.get('format')!r}, expected {FORMAT!r}")
        n = header["num_shards"]
        present = set(storage.listdir(uri))
        shards = []
        for k in range(n):
            name = shard_name(k, n)
            if name + ".json" not in present:
                raise FileNotFoundError(
                    f"{uri}: shard {name} is not finished; rerun `lvm pretokenize` (it skips finished shards)"
                )
            index = json.loads(storage.read_text(storage.join(uri, name + ".json")))
            shards.append(
                ShardIndex(
                    storage.join(uri, name + ".npz"),
                    np.asarray(index["lengths"], np.int64),
                    index["vision_runs"],
                    index["ids"],
                )
            )
        return cls(uri, header, shards)
