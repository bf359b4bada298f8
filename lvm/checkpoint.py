"""Checkpoint folders: training checkpoints (Orbax: asynchronous, sharded, keep-last-K, restorable onto any
mesh), `lvm export` folders, and the `config.yaml` / `tokenizers.json` files both hold.

A checkpoint step holds three items: `params` and `opt_state` (sharded arrays; every process writes its own
shards) and `meta` (JSON: step, RNG key data, the data loader's state, the resolved config, last metrics).
Orbax writes a step into a temporary folder and renames it when complete, so a step interrupted while being
written (kill -9, preemption) is never listed by `latest_step` and is cleaned up on the next start.

Restoring takes abstract targets (`jax.ShapeDtypeStruct` with a sharding), so arrays are read straight onto
the target mesh, whatever mesh wrote them.

A model folder is either a training workdir (`config.yaml`, `checkpoints/`) or an export folder (`config.yaml`,
`params/`, written by `export`); both may hold `tokenizers.json` (the absolute paths of the SentencePiece model
and VQGAN workdir the model's data was made with). `load_params` reads either, after checking the shapes.

Every folder here may be local or a `gs://` URI. The small files go through `lvm.data_pipeline.storage` (whole
objects, written atomically); Orbax writes and reads the arrays itself: on `gs://` it writes a step in place and
marks it complete with a `commit_success.txt` written last (GCS has no rename), so `latest_step` never lists a
step that was interrupted either. Orbax's file layer (etils) is pointed at gcsfs, the client `storage` uses, and
with `STORAGE_EMULATOR_HOST` set (a loopback GCS server) TensorStore is pointed at the same server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from lvm.config import Config, ConfigError, MeshConfig, config_from_dict, config_to_dict
from lvm.data_pipeline import storage
from lvm.model import param_shapes, param_shardings

ITEMS = ("params", "opt_state", "meta")
CONFIG_FILE = "config.yaml"
TOKENIZERS_FILE = "tokenizers.json"
# the model config keys that fix parameter shapes (theta, dtypes and the mesh may change between runs)
SHAPE_KEYS = ("text_vocab_size", "vision_vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads")
SHAPE_KEYS += ("head_dim", "mlp_dim")


def resolve_uri(path: str | os.PathLike) -> str:
    """A path as a string: a `gs://` URI as given, a local path made absolute. `Path("gs://b/x")` collapses
    the scheme's slashes to `gs:/b/x`; that form is read as the URI it came from."""
    d = os.fspath(path).rstrip("/") or "/"
    if d.startswith("gs:/") and not storage.is_gcs(d):
        d = "gs://" + d[len("gs:/") :]
    return d if storage.is_gcs(d) else str(Path(d).resolve())


def is_folder(uri: str) -> bool:
    """A local folder, or a `gs://` prefix holding at least one object."""
    return bool(storage.listdir(uri)) if storage.is_gcs(uri) else Path(uri).is_dir()


def _gcs_clients() -> None:
    """Point Orbax's gs:// clients where `storage` points: etils' paths through fsspec (gcsfs) rather than
    tf.io.gfile, which ignores STORAGE_EMULATOR_HOST (`EPATH_USE_TF=false` unless set); TensorStore at the
    emulator when one is set."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    from etils.epath import gpath

    # etils reads EPATH_USE_TF once, at its first path operation (jax's compile cache may have made it)
    choice = getattr(gpath, "_is_tf_installed", None)
    if hasattr(choice, "cache_clear"):
        choice.cache_clear()
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = storage.endpoint()


def _path(directory: str | os.PathLike) -> str | Path:
    """What Orbax takes: a gs:// URI (its clients set up) or an absolute local Path."""
    d = resolve_uri(directory)
    if storage.is_gcs(d):
        _gcs_clients()
        return d
    return Path(d)


class Checkpointer:
    """Saves and restores (params, opt_state, meta) by step under `directory`.

    `cleanup`: delete steps left incomplete by an interrupted save when opened (only the run that writes the
    checkpoints may: a reader could delete the step a live run is writing)."""

    def __init__(
        self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True, cleanup: bool = False
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=cleanup,
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

    def reload(self) -> None:
        """Read the complete steps from storage again (after a failed save, which was already listed)."""
        self.manager.reload()

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


def _params_path(out_dir: str | os.PathLike) -> str | Path:
    return _path(storage.join(resolve_uri(out_dir), "params"))


def export_params(params, out_dir: str | os.PathLike) -> str:
    """Write params alone (an Orbax PyTree checkpoint at `out_dir/params`); returns that path."""
    target = _params_path(out_dir)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, params, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    return str(target)


def load_exported_params(out_dir: str | os.PathLike, abstract_params):
    """Params written by `export_params`, placed on the targets' shardings."""
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(_params_path(out_dir), abstract_params)
    finally:
        ckptr.close()


# Model folders ----------------------------------------------------------------------------------------------


def write_config(folder: str | os.PathLike, cfg: Config) -> None:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    storage.write_bytes(storage.join(resolve_uri(folder), CONFIG_FILE), text.encode())


def read_config(folder: str | os.PathLike) -> Config:
    """The resolved config a training workdir or export folder was written with."""
    try:
        text = storage.read_text(storage.join(resolve_uri(folder), CONFIG_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no model at {resolve_uri(folder)} (no {CONFIG_FILE}): give a training workdir (`lvm train "
            "--workdir`) or an `lvm export` folder"
        ) from None
    return config_from_dict(yaml.safe_load(text))


def write_tokenizers(folder: str | os.PathLike, tokenizers: dict[str, str | None]) -> None:
    text = json.dumps(tokenizers, indent=1)
    storage.write_bytes(storage.join(resolve_uri(folder), TOKENIZERS_FILE), text.encode())


def read_tokenizers(folder: str | os.PathLike) -> dict:
    """`{"text_tokenizer": path, "vqgan": path}` of a model folder ({} when it names none)."""
    try:
        return json.loads(storage.read_text(storage.join(resolve_uri(folder), TOKENIZERS_FILE)))
    except FileNotFoundError:
        return {}


def check_same_shapes(saved: Config, cfg: Config, where: str) -> None:
    """A checkpoint's model must have this config's parameter shapes (theta, dtypes, mesh may change)."""
    diff = [
        f"model.{k}: {getattr(saved.model, k)} -> {getattr(cfg.model, k)}"
        for k in SHAPE_KEYS
        if getattr(saved.model, k) != getattr(cfg.model, k)
    ]
    if diff:
        raise ConfigError(
            f"{where} holds a model of other shapes ({'; '.join(diff)}); use a new workdir or the old model config"
        )


def export(folder: str | os.PathLike, params, cfg: Config, tokenizers: dict[str, str | None]) -> str:
    """Write an export folder (params/, config.yaml, tokenizers.json); returns the params path."""
    path = export_params(params, folder)
    if jax.process_index() == 0:
        write_config(folder, cfg)
        write_tokenizers(folder, tokenizers)
    return path


def load_params(source: str | os.PathLike, cfg: Config, mesh, abstract_params=None):
    """Params for `cfg` on `mesh` from a training workdir (newest checkpoint) or an export folder."""
    source = resolve_uri(source)
    if abstract_params is None:
        abstract_params = abstract_tree(param_shapes(cfg.model), param_shardings(cfg, mesh))
    checkpoints = storage.join(source, "checkpoints")
    if is_folder(storage.join(source, "params")) and storage.exists(storage.join(source, CONFIG_FILE)):
        check_same_shapes(read_config(source), cfg, source)  # exported
        return load_exported_params(source, abstract_params)
    if not is_folder(checkpoints):
        raise FileNotFoundError(
            f"{source} is neither a training workdir (no checkpoints/) nor an `lvm export` folder "
            f"(params/ + {CONFIG_FILE})"
        )
    ckpt = Checkpointer(checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no complete checkpoint under {checkpoints}; give a training workdir that has one or an "
                "`lvm export` folder"
            )
        check_same_shapes(config_from_dict(ckpt.restore_meta(step)["config"]), cfg, source)
        return ckpt.restore(step, abstract_params)[0]
    finally:
        ckpt.close()


def restore_model(
    folder: str | os.PathLike, mesh: MeshConfig, devices=None
) -> tuple[Config, jax.sharding.Mesh, Any]:
    """(config, mesh, params) of a model folder, on `mesh` over `devices` (default: all of them)."""
    import dataclasses

    from lvm.sharding import make_mesh

    devices = list(jax.devices() if devices is None else devices)
    cfg = read_config(folder)
    cfg = dataclasses.replace(cfg, mesh=mesh.resolve(len(devices)))
    cfg.check_devices(len(devices))
    device_mesh = make_mesh(cfg.mesh, devices)
    return cfg, device_mesh, load_params(folder, cfg, device_mesh)
