"""Flax VQGAN (encoder, vector quantizer, decoder) and `VQGANTokenizer`: uint8 frames <-> codes on all devices.

Architecture (default config = the open 256x256 tokenizer LWM uses): conv 3x3 -> per level `num_res_blocks`
ResNet blocks (GroupNorm + SiLU, no attention) and a stride-2 conv downsample (all levels but the last) -> middle
ResNet blocks -> GroupNorm, SiLU, conv to `latent_dim` -> 1x1 quant conv -> quantizer; decoding mirrors it with a
1x1 post-quant conv, conv 3x3, `num_res_blocks` middle ResNet blocks, then per level `up_res_blocks` ResNet blocks
(`decoder_res_blocks`, default `num_res_blocks`; LWM's tokenizer has 3) and nearest-neighbour 2x upsampling +
conv 3x3 (all levels but the last). Arrays are NHWC; pixels are in [-1, 1].

A VQGAN folder (what `lvm train-vqgan` writes and `VQGANTokenizer.load` reads): `config.yaml` and `checkpoints/`
(Orbax steps with items `model` = params + codebook and `train` = optimiser state etc.; `train` is optional).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lvm.tokenizers.config import ModelConfig, VQGANConfig
from lvm.tokenizers.quantizer import VectorQuantizer


class ResBlock(nn.Module):
    channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, C_in] -> [B, H, W, channels]
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(x))
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(h))
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), dtype=self.dtype)(x)
        return x + h


class Encoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> [B, H/f, W/f, latent_dim]
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        h = nn.Conv(cfg.base_channels, (3, 3), dtype=dtype)(x)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                h = ResBlock(cfg.base_channels * mult, cfg.norm_groups, dtype)(h)
            if level < len(cfg.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=dtype)(h)
        for _ in range(cfg.num_res_blocks):
            h = ResBlock(h.shape[-1], cfg.norm_groups, dtype)(h)
        h = nn.silu(nn.GroupNorm(cfg.norm_groups, dtype=dtype)(h))
        return nn.Conv(cfg.latent_dim, (3, 3), dtype=dtype)(h)


class Decoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, z):  # [B, h, w, latent_dim] -> [B, h*f, w*f, 3]
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        h = nn.Conv(cfg.base_channels * cfg.channel_mult[-1], (3, 3), dtype=dtype)(z)
        for _ in range(cfg.num_res_blocks):
            h = ResBlock(h.shape[-1], cfg.norm_groups, dtype)(h)
        for level in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.up_res_blocks):
                h = ResBlock(cfg.base_channels * cfg.channel_mult[level], cfg.norm_groups, dtype)(h)
            if level > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, hh * 2, ww * 2, c), method="nearest")
                h = nn.Conv(c, (3, 3), dtype=dtype)(h)
        h = nn.silu(nn.GroupNorm(cfg.norm_groups, dtype=dtype)(h))
        return nn.Conv(3, (3, 3), dtype=dtype, name="conv_out")(h).astype(jnp.float32)


class VQGAN(nn.Module):
    """`__call__(x, train)` -> (reconstruction, codes, stats); `encode(x)` -> (codes, latents); `decode(codes)`."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv(cfg.latent_dim, (1, 1))
        self.quantizer = VectorQuantizer(
            cfg.codebook_size, cfg.latent_dim, cfg.quantizer, cfg.ema_decay, cfg.commitment
        )
        self.post_quant_conv = nn.Conv(cfg.latent_dim, (1, 1))
        self.decoder = Decoder(cfg)

    def latents(self, x):
        """Pre-quantization latents `[B, h, w, D]` (float32) of frames `[B, H, W, 3]` in [-1, 1]."""
        return self.quant_conv(self.encoder(x).astype(jnp.float32))

    def __call__(self, x, train: bool = False):
        z_q, codes, stats = self.quantizer(self.latents(x), train=train)
        return self.decoder(self.post_quant_conv(z_q)), codes, stats

    def encode(self, x):
        """Codes `[B, h, w]` (int32) of frames `[B, H, W, 3]` in [-1, 1]."""
        return self.quantizer(self.latents(x))[1]

    def decode(self, codes):
        """Frames `[B, H, W, 3]` in about [-1, 1] of codes `[B, h, w]`."""
        return self.decoder(self.post_quant_conv(self.quantizer.lookup(codes)))


def to_pixels(frames_u8):
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return frames_u8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def init_variables(cfg: ModelConfig, seed: int = 0) -> dict:
    """Randomly initialised variables (`params`, `codebook`) of a VQGAN."""
    x = jnp.zeros((1, cfg.resolution, cfg.resolution, 3), jnp.float32)
    return dict(jax.jit(VQGAN(cfg).init)(jax.random.key(seed), x))


def checkpoint_manager(folder: str | os.PathLike, create: bool = True) -> ocp.CheckpointManager:
    """The Orbax manager of a VQGAN folder's `checkpoints/` (items `model` and `train`)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create)
    return ocp.CheckpointManager(
        Path(folder).resolve() / "checkpoints", options=options, item_names=("model", "train")
    )


def save_config(cfg: VQGANConfig, folder: str | os.PathLike) -> None:
    """Write the folder's `config.yaml`."""
    os.makedirs(folder, exist_ok=True)
    Path(folder, "config.yaml").write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def save_model(cfg: VQGANConfig, variables: dict, folder: str | os.PathLike, step: int = 0) -> None:
    """Write a loadable VQGAN folder holding `variables` (`params` + `codebook`) alone, e.g. converted weights."""
    save_config(cfg, folder)
    mngr = checkpoint_manager(folder)
    model = {"params": variables["params"], "codebook": variables["codebook"]}
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model)), force=True)
    mngr.wait_until_finished()
    mngr.close()


def _plain(d):
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    return list(d) if isinstance(d, tuple) else d


@dataclasses.dataclass
class VQGANTokenizer:
    """Frames <-> codes with a trained VQGAN, jitted and data-parallel over `devices` (default: all local ones).

    Frames go through in chunks of at most `max_frames_per_device * len(devices)`, each padded to a multiple of
    the device count (chunk sizes are powers of two per device, so few shapes are compiled): any number of
    frames fits in memory.
    """

    cfg: ModelConfig
    variables: dict
    devices: list | None = None
    max_frames_per_device: int = 8

    def __post_init__(self):
        self.devices = list(self.devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.variables = jax.device_put(self.variables, replicated)
        model = VQGAN(self.cfg)
        self._encode = jax.jit(
            lambda v, f: model.apply(v, to_pixels(f), method=VQGAN.encode),
            in_shardings=(replicated, self._batch),
            out_shardings=self._batch,
        )
        self._decode = jax.jit(
            lambda v, c: to_uint8(model.apply(v, c, method=VQGAN.decode)),
            in_shardings=(replicated, self._batch),
            out_shardings=self._batch,
        )

    @classmethod
    def load(cls, folder: str | os.PathLike, devices=None, **kwargs) -> VQGANTokenizer:
        """The tokenizer of a VQGAN folder (its `config.yaml` and newest checkpoint)."""
        folder = Path(folder)
        if not (folder / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{folder} is not a VQGAN folder (no config.yaml); give `lvm train-vqgan`'s --workdir"
            )
        cfg = VQGANConfig.from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        if not (folder / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"no checkpoint under {folder / 'checkpoints'}; train or convert a VQGAN there"
            )
        mngr = checkpoint_manager(folder, create=False)
        try:
            step = mngr.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no complete checkpoint under {folder / 'checkpoints'}; train or convert a VQGAN there"
                )
            # read onto one local device whatever device count wrote it (the tokenizer replicates them itself)
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shapes = jax.eval_shape(lambda: init_variables(cfg.model))
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)
            restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
        finally:
            mngr.close()
        return cls(cfg.model, dict(restored["model"]), devices=devices, **kwargs)

    @property
    def code_shape(self) -> tuple[int, int]:
        return self.cfg.code_shape

    def encode(self, frames) -> np.ndarray:
        """uint8 frames `[T, H, W, 3]` -> int32 codes `[T, h, w]`."""
        frames = np.asarray(frames)
        size = self.cfg.resolution
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 in [0, 255], got dtype {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
            raise ValueError(
                f"frames must be [T, {size}, {size}, 3] (RGB at the config's resolution), got shape {frames.shape}"
            )
        return self._chunked(self._encode, frames, (*self.code_shape,), np.int32)

    def decode(self, codes) -> np.ndarray:
        """int codes `[T, h, w]` -> uint8 frames `[T, H, W, 3]`."""
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.ndim != 3 or codes.shape[1:] != self.code_shape:
            raise ValueError(
                f"codes must be [T, {self.code_shape[0]}, {self.code_shape[1]}], got {codes.shape}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.cfg.codebook_size}), got [{codes.min()}, {codes.max()}]"
            )
        size = self.cfg.resolution
        return self._chunked(self._decode, codes.astype(np.int32), (size, size, 3), np.uint8)

    def _chunked(self, fn, x: np.ndarray, out_shape: tuple, out_dtype) -> np.ndarray:
        n_dev = len(self.devices)
        out = np.empty((len(x), *out_shape), out_dtype)
        start = 0
        while start < len(x):
            per_device = min(
                self.max_frames_per_device, 2 ** math.ceil(math.log2(-(-(len(x) - start) // n_dev)))
            )
            chunk = x[start : start + per_device * n_dev]
            pad = per_device * n_dev - len(chunk)
            padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
            result = np.asarray(fn(self.variables, jax.device_put(padded, self._batch)))
            out[start : start + len(chunk)] = result[: len(chunk)]
            start += len(chunk)
        return out
