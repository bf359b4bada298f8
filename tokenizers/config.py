"""VQGAN configuration: typed, frozen dataclasses read from YAML (`configs/vqgan/*.yaml`) plus `key=value` overrides.

A file holds two sections, `model` (the network and quantizer) and `train` (losses, optimiser, data sampling).
Every bad value fails at load time with a ValueError that names the fix, before anything is compiled:

    cfg = load_config("tiny", ["train.batch_size=8", "model.codebook_size=128"])
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "vqgan"
QUANTIZERS = ("ema", "l2")  # EMA codebook (decay) or l2-normalised codes learned by gradient
RECON_LOSSES = ("l1", "l2")
DTYPES = ("float32", "bfloat16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """VQGAN network (defaults: the open 256x256 tokenizer LWM uses, 16x16 = 256 codes per frame)."""

    resolution: int = 256  # frames are resolution x resolution x 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)  # one level each; every level but the last halves H, W
    num_res_blocks: int = 2  # ResNet blocks per level (and in the middle)
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    latent_dim: int = 64  # encoder output = codebook vector size
    codebook_size: int = 8192
    quantizer: str = "ema"
    ema_decay: float = 0.99
    commitment: float = 0.25  # weight of ||z - sg(e)||^2
    dtype: str = "float32"  # compute dtype (params are float32)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        _require(
            self.quantizer in QUANTIZERS, f"model.quantizer={self.quantizer!r}: choose one of {QUANTIZERS}"
        )
        _require(self.dtype in DTYPES, f"model.dtype={self.dtype!r}: choose one of {DTYPES}")
        _require(len(self.channel_mult) >= 1, "model.channel_mult needs at least one level")
        for name in (
            "resolution",
            "base_channels",
            "num_res_blocks",
            "latent_dim",
            "codebook_size",
            "norm_groups",
        ):
            _require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        _require(0 < self.ema_decay < 1, f"model.ema_decay={self.ema_decay} must lie in (0, 1)")
        factor = self.downsample_factor
        _require(
            self.resolution % factor == 0,
            f"model.resolution={self.resolution} must be a multiple of 2**(levels-1) = {factor}",
        )
        for ch in {self.base_channels * m for m in self.channel_mult}:
            _require(
                ch % self.norm_groups == 0, f"model.norm_groups={self.norm_groups} must divide channels {ch}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def code_shape(self) -> tuple[int, int]:
        """Codes per frame as (h, w)."""
        side = self.resolution // self.downsample_factor
        return side, side


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """VQGAN training: losses, optimiser, data sampling, logging."""

    batch_size: int = 16  # frames per step (global); padded to a multiple of the device count
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    b1: float = 0.5
    b2: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    recon_loss: str = "l1"
    codebook_weight: float = 1.0  # weight of ||sg(z) - e||^2 (l2 quantizer only; EMA updates the codebook)
    restart_every: int = 100  # codes unused for this many steps are re-seeded from encoder outputs; 0: never
    gan_weight: float = 0.0  # 0: no discriminator
    gan_start: int = 10000  # step from which the adaptive-weight hinge GAN loss is on
    disc_channels: int = 64
    disc_layers: int = 3
    disc_learning_rate: float = 1e-4
    perceptual_weight: float = 0.0  # > 0 needs perceptual_weights
    perceptual_weights: str | None = None  # .npz of VGG16 conv weights (see lvm.tokenizers.perceptual)
    frames_per_video: int = 8  # frames decoded per video visit (random clip positions)
    log_every: int = 50
    image_every: int = 500
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self):
        _require(
            self.recon_loss in RECON_LOSSES, f"train.recon_loss={self.recon_loss!r}: choose {RECON_LOSSES}"
        )
        for name in ("batch_size", "learning_rate", "log_every", "image_every", "checkpoint_every"):
            _require(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        _require(
            self.perceptual_weight == 0 or self.perceptual_weights,
            "train.perceptual_weight > 0 needs train.perceptual_weights=PATH.npz (pretrained VGG16 weights); "
            "set train.perceptual_weight=0 to train without a perceptual loss",
        )


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = f.type if isinstance(f.type, type) else globals()[f.type]
            values = dict(d.get(f.name) or {})
            known = {g.name for g in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            _require(
                not unknown, f"unknown key(s) {sorted(unknown)} in section {f.name!r}; known: {sorted(known)}"
            )
            sections[f.name] = section_cls(**values)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        _require(not unknown, f"unknown section(s) {sorted(unknown)}; use 'model' and 'train'")
        return cls(**sections)


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> VQGANConfig:
    """A config from `configs/vqgan/NAME.yaml` or a YAML path, then `section.key=value` overrides."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no VQGAN config {name_or_path!r}: give a YAML path or one of {known}")
    d = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        _require(bool(sep and dot), f"override {item!r} must look like section.key=value")
        d.setdefault(section, {})[name] = _parse_value(section, name, value)
    return VQGANConfig.from_dict(d)


def _parse_value(section: str, name: str, value: str):
    cls = {"model": ModelConfig, "train": TrainConfig}.get(section)
    _require(cls is not None, f"unknown section {section!r}; use 'model' or 'train'")
    hints = typing.get_type_hints(cls)
    _require(name in hints, f"unknown key {section}.{name}; known: {sorted(hints)}")
    parsed = yaml.safe_load(value)
    if hints[name] == tuple[int, ...] and isinstance(parsed, str | int):
        parsed = [int(v) for v in str(parsed).split(",")]
    elif hints[name] is float and isinstance(parsed, str | int):
        try:
            parsed = float(parsed)  # YAML reads "1e-3" as a string
        except ValueError:
            raise ValueError(f"{section}.{name}={value!r} is not a number") from None
    return parsed
