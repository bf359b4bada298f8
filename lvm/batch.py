"""The packed training batch: one definition of its fields, dtypes and shardings for the loader, the model, the
planner and the trainer.

Every field is `[batch, seq]` in natural token order, the batch split over (dp, fsdp) and the sequence over sp
(`lvm.sharding.TOKENS`). Importing this module does not import jax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Batch(NamedTuple):
    """A packed global batch (jax or numpy arrays, or their shapes).

    tokens: int ids (text or vision vocabulary, per `vision_mask`); positions: RoPE positions (restart per
    document); segment_ids: document ids (attention stays within a segment; compared for equality only; 0 is
    padding); targets: next-token ids (vision vocabulary where `target_vision_mask`); loss_mask: 0/1 (or
    float) weights.
    """

    tokens: Any
    vision_mask: Any
    positions: Any
    segment_ids: Any
    targets: Any
    target_vision_mask: Any
    loss_mask: Any


DTYPES = Batch(
    tokens=np.dtype(np.int32),
    vision_mask=np.dtype(np.bool_),
    positions=np.dtype(np.int32),
    segment_ids=np.dtype(np.int32),
    targets=np.dtype(np.int32),
    target_vision_mask=np.dtype(np.bool_),
    loss_mask=np.dtype(np.float32),
)


def zeros(shape: tuple[int, ...]) -> Batch:
    """A numpy batch of zeros of `shape` (e.g. `(seq_len,)` for one row being packed)."""
    return Batch(*(np.zeros(shape, dt) for dt in DTYPES))


def batch_shardings(mesh) -> Batch:
    """Each field's NamedSharding on `mesh`."""
    from lvm.sharding import TOKENS, logical_sharding

    return Batch(*[logical_sharding(mesh, TOKENS)] * len(Batch._fields))


def abstract_batch(batch_size: int, seq_len: int, mesh) -> Batch:
    """`jax.ShapeDtypeStruct`s of a global batch with its shardings (for ahead-of-time compiles)."""
    import jax

    return Batch(
        *(
            jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sh)
            for dt, sh in zip(DTYPES, batch_shardings(mesh), strict=True)
        )
    )
