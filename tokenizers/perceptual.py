"""Perceptual loss from user-supplied VGG16 weights (no weights ship with the project).

The `.npz` holds `conv{b}_{i}/kernel` ([3, 3, in, out], HWIO) and `conv{b}_{i}/bias` for the 13 convolutions of
VGG16 (blocks b = 1..5 with 2, 2, 3, 3, 3 convolutions), e.g. converted from torchvision's ImageNet VGG16 by
transposing each OIHW kernel to HWIO. The loss is the LPIPS distance without its learned linear heads: for the
last ReLU of each block, channel-normalised features are compared by mean squared difference, summed over blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = (2, 2, 3, 3, 3)  # convolutions per VGG16 block
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def layer_names() -> list[str]:
    return [f"conv{b}_{i}" for b, n in enumerate(BLOCKS, 1) for i in range(1, n + 1)]


@dataclasses.dataclass(frozen=True)
class PerceptualLoss:
    """`loss(x, y)` for images `[B, H, W, 3]` in [-1, 1] -> scalar."""

    weights: dict  # name -> (kernel, bias)

    @classmethod
    def from_npz(cls, path: str) -> PerceptualLoss:
        data = np.load(path)
        weights = {}
        for name in layer_names():
            for part in ("kernel", "bias"):
                if f"{name}/{part}" not in data:
                    raise ValueError(
                        f"{path} lacks VGG16 array {name}/{part} (see lvm.tokenizers.perceptual)"
                    )
            weights[name] = (jnp.asarray(data[f"{name}/kernel"]), jnp.asarray(data[f"{name}/bias"]))
        return cls(weights)

    def features(self, x) -> list[jax.Array]:
        h = ((x + 1.0) / 2.0 - IMAGENET_MEAN) / IMAGENET_STD
        out = []
        for b, n in enumerate(BLOCKS, 1):
            if b > 1:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            for i in range(1, n + 1):
                kernel, bias = self.weights[f"conv{b}_{i}"]
                h = jax.lax.conv_general_dilated(
                    h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                h = jax.nn.relu(h + bias)
            out.append(h)
        return out

    def __call__(self, x, y):
        total = jnp.zeros(())
        for fx, fy in zip(self.features(x), self.features(y), strict=True):
            nx = fx * jax.lax.rsqrt(jnp.sum(fx * fx, axis=-1, keepdims=True) + 1e-10)
            ny = fy * jax.lax.rsqrt(jnp.sum(fy * fy, axis=-1, keepdims=True) + 1e-10)
            total = total + jnp.mean(jnp.sum((nx - ny) ** 2, axis=-1))
        return total
