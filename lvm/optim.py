"""AdamW with a warmup + constant/cosine schedule, gradient clipping and weight decay that skips norms."""

from __future__ import annotations

import jax
import optax

from lvm.config import TrainConfig


def learning_rate(t: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then constant or cosine decay to `end_lr`."""
    warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
    rest = max(t.steps - t.warmup_steps, 1)
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(t.lr, rest, alpha=t.end_lr / t.lr)
    else:
        after = optax.constant_schedule(t.lr)
    if t.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [t.warmup_steps])


def decay_mask(params, decay_norms: bool = False):
    """True for parameters that get weight decay: every matrix; 1-D ones (norms, biases) only if asked.

    Stacked layers carry a leading layer axis, so a parameter counts as 1-D when its per-layer shape is."""

    def decays(path, x):
        per_layer = x.ndim - 1 if any(getattr(k, "key", None) == "layers" for k in path) else x.ndim
        return decay_norms or per_layer > 1

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """The training optimizer of `t` (AdamW b1/b2, clip, decoupled weight decay masked by `decay_mask`)."""
    parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            learning_rate(t),
            b1=t.b1,
            b2=t.b2,
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
            mask=lambda params: decay_mask(params, t.decay_norms),
        )
    )
    return optax.chain(*parts)
