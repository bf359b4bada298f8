"""Write a params checkpoint that `lvm.checkpoint.load_exported_params` restores, one block at a time.

`lvm.checkpoint.export_params` needs the whole tree in memory. This writer instead lays out the same Orbax
PyTree checkpoint (`StandardCheckpointHandler`, the non-OCDBT variant: one zarr v2 array per leaf, named by its
dot-joined key path, zstd-compressed, plus `_METADATA` and `_CHECKPOINT_METADATA`) and fills each array with
TensorStore writes of whole chunks, so a converter holds one chunk at a time. The folder is written under a
temporary name and renamed when complete, as Orbax does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

CHUNK_BYTES = 64 << 20  # target size of one zarr chunk (rows of the leading axis)


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


class ParamsWriter:
    """Create every leaf of `shapes` ({key path tuple: (shape, dtype)}) under `path`, then `write` blocks.

    Chunks span whole rows of the leading axis (`chunk_rows`); write row blocks aligned to them so no chunk is
    read back and rewritten. `close()` adds the metadata and renames the folder into place."""

    def __init__(self, path: str | os.PathLike, shapes: dict, chunk_rows: dict | None = None):
        self.path = Path(path).resolve()
        self.tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shapes = {k: (tuple(s), np.dtype(d)) for k, (s, d) in shapes.items()}
        self.chunk_rows = {
            k: (chunk_rows or {}).get(k) or self.default_rows(*v) for k, v in self.shapes.items()
        }
        self.arrays = {k: self._create(k) for k in self.shapes}

    @staticmethod
    def default_rows(shape: tuple, dtype: np.dtype) -> int:
        if not shape:
            return 1
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        return max(1, min(shape[0], CHUNK_BYTES // max(row, 1)))

    def _chunks(self, key) -> list[int]:
        shape, _ = self.shapes[key]
        return [self.chunk_rows[key], *shape[1:]] if shape else []

    def _create(self, key):
        shape, dtype = self.shapes[key]
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(self.tmp / ".".join(key))},
            "metadata": {
                "shape": list(shape),
                "chunks": self._chunks(key),
                "dtype": _zarr_dtype(dtype),
                "compressor": {"id": "zstd", "level": 1},
                "fill_value": None,
                "order": "C",
                "dimension_separator": ".",
            },
        }
        return ts.open(spec, create=True, delete_existing=True).result()

    def write(self, key, index: tuple, block: np.ndarray) -> None:
        """Write `block` at `index` (a tuple of ints/slices) of leaf `key`."""
        shape, dtype = self.shapes[key]
        self.arrays[key][index].write(np.asarray(block, dtype)).result()

    def fill_zeros(self, key) -> None:
        """Write zeros into a whole leaf, chunk by chunk."""
        shape, dtype = self.shapes[key]
        rows = self.chunk_rows[key]
        for r in range(0, shape[0], rows):
            block = np.zeros((min(rows, shape[0] - r), *shape[1:]), dtype)
            self.write(key, (slice(r, r + len(block)),), block)

    def close(self) -> str:
        """Write the metadata and move the checkpoint into place; returns its path."""
        tree = {
            str(tuple(key)): {
                "key_metadata": [{"key": k, "key_type": 2} for k in key],
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": self._chunks(key),
                },
            }
            for key in self.shapes
        }
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        (self.tmp / "_METADATA").write_text(json.dumps(meta))
        now = time.time_ns()
        handler = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
        checkpoint_meta = {
            "item_handlers": handler,
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now,
            "custom_metadata": {},
        }
        (self.tmp / "_CHECKPOINT_METADATA").write_text(json.dumps(checkpoint_meta))
        shutil.rmtree(self.path, ignore_errors=True)
        self.tmp.rename(self.path)
        return str(self.path)
