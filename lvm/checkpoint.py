"""Training checkpoints with Orbax: asynchronous, sharded, keep-last-K, restorable onto any mesh.

A checkpoint step holds three items: `params` and `opt_state` (sharded arrays; every process writes its own
shards) and `meta` (JSON: step, RNG key data, the data loader's state, the resolved config, last metrics).
Orbax writes a step into a temporary folder and renames it when complete, so a step interrupted while being
written (kill -9, preemption) is never listed by `latest_step` and is cleaned up on the next start.

Restoring takes abstract targets (`jax.ShapeDtypeStruct` with a sharding), so arrays are read straight onto
the target mesh, whatever mesh wrote them. `export_params` writes params alone for inference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")


def _path(directory: str | os.PathLike) -> str | Path:
    d = str(directory)
    return d if d.startswith("gs://") else Path(d).resolve()


class Checkpointer:
    """Saves and restores (params, opt_state, meta) by step under `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.directory = _path(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Start writing step `step` (returns before the write finishes when asynchronous)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """(params, opt_state or None, meta) of `step`, placed on the targets' shardings."""
        args = {
            "params": ocp.args.StandardRestore(abstract_params),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["meta"]

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Block until pending asynchronous writes are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_tree(shapes, shardings):
    """ShapeDtypeStructs carrying target shardings (what restore reads onto)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def export_params(params, out_dir: str | os.PathLike) -> str:
    """Write params alone (an Orbax PyTree checkpoint at `out_dir/params`); returns that path."""
    path = _path(out_dir)
    target = f"{path}/params" if isinstance(path, str) else path / "params"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, params, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    return str(target)


def load_exported_params(out_dir: str | os.PathLike, abstract_params):
    """Params written by `export_params`, placed on the targets' shardings."""
    path = _path(out_dir)
    target = f"{path}/params" if isinstance(path, str) else path / "params"
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(target, abstract_params)
    finally:
        ckptr.close()
