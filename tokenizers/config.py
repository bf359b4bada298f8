"""VQGAN configuration: typed, frozen dataclasses read from YAML (`configs/vqgan/*.yaml`) plus `key=value` overrides.

A file holds two sections, `model` (the network and quantizer) and `train` (losses, optimiser, data sampling).
Every bad value fails at load time with a ValueError that names the fix, before anything is compiled:

    cfg = load_config("tiny", ["train.batch_size=8", "model.codebook_size=128"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from lvm import schema
from lvm.schema import require as _require

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "vqgan"
QUANTIZERS = ("ema", "l2")  # EMA codebook (decay) or l2-normalised codes learned by gradient
RECON_LOSSES = ("l1", "l2")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """VQGAN network (defaults: the open 256x256 tokenizer LWM uses, 16x16 = 256 codes per frame, except that
    LWM's decoder has decoder_res_blocks=3; `lvm convert-lwm` sets it from the imported tree)."""

    resolution: int = 256  # frames are resolution x resolution x 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)  # one level each; every level but the last halves H, W
    num_res_blocks: int = 2  # ResNet blocks per level (and in the middle)
    # ResNet blocks per decoder up level; None: num_res_blocks. LWM's tokenizer has num_res_blocks + 1 (3).
    decoder_res_blocks: int | None = None
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
        _require(
            self.decoder_res_blocks is None or self.decoder_res_blocks > 0,
            f"model.decoder_res_blocks={self.decoder_res_blocks} must be positive (or null: num_res_blocks)",
        )
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
    def up_res_blocks(self) -> int:
        """ResNet blocks per decoder up level (`decoder_res_blocks`, or `num_res_blocks` when unset)."""
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

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
        return schema.from_dict(cls, d)


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> VQGANConfig:
    """A config from `configs/vqgan/NAME.yaml` or a YAML path, then `section.key=value` overrides."""
    return schema.load(VQGANConfig, [name_or_path], overrides, CONFIG_DIR)
