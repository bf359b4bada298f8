"""Synthetic text corpora for tests and tiny curricula, written in the pre-tokenized shard format.

"markov_copy": every document is a block of `block` tokens drawn from one fixed sparse Markov chain (each token
has 4 likely successors), repeated until the document has `doc_len` tokens. A model learns the chain's bigrams
first (loss falls from ln V towards ln 4) and then to copy the block from earlier context, so loss at later
positions drops further: the position-bucketed validation loss shows whether longer context helps.
"""

from __future__ import annotations

import numpy as np

from lvm.data_pipeline import shards, storage
from lvm.tokenizers.format import TokenRecord, VisionVocab

SUCCESSORS = 4


def markov_copy_documents(n_docs: int, doc_len: int, block: int, vocab: int, seed) -> list[np.ndarray]:
    """`n_docs` int32 documents of `doc_len` tokens over ids [1, vocab) (0 is left for padding); `seed` is
    anything `np.random.default_rng` takes."""
    chain = np.random.default_rng(12345)  # the same chain for every split and seed
    successors = chain.integers(1, vocab, size=(vocab, SUCCESSORS))
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        ids = np.empty(block, np.int64)
        ids[0] = rng.integers(1, vocab)
        for i in range(1, block):
            ids[i] = successors[ids[i - 1], rng.integers(SUCCESSORS)]
        docs.append(np.resize(ids, doc_len).astype(np.int32))
    return docs


def write_corpus(
    uri: str, docs: list[np.ndarray], vocab_size: int, shard_size: int = 64, vision: VisionVocab | None = None
) -> str:
    """Write text documents (every token a target) as a corpus the loader reads; returns `uri`."""
    vision = vision or VisionVocab()
    n = max(1, -(-len(docs) // shard_size))
    storage.makedirs(uri)
    for k in range(n):
        part = docs[k * shard_size : (k + 1) * shard_size]
        records = [TokenRecord(d, np.zeros(len(d), bool), np.ones(len(d), np.float32)) for d in part]
        ids = [str(k * shard_size + i) for i in range(len(part))]
        shards.write_shard(uri, k, n, records, ids, vision, [])
    header = {
        "format": shards.FORMAT,
        "num_shards": n,
        "shard_size": shard_size,
        "text_vocab_size": vocab_size,
        "vision_n_codes": vision.n_codes,
        "vision_vocab_size": vision.size,
        "synthetic": True,
    }
    storage.write_json(storage.join(uri, shards.HEADER), header)  # written last: the corpus is complete
    return uri
