"""VQGAN training and evaluation: `train(cfg, videos, steps, workdir)` and `evaluate(tokenizer, videos)`.

One jitted step, data-parallel over all local devices (batch sharded on a 1-D mesh `data`, state replicated):
L1/L2 reconstruction + commitment (+ codebook term for the l2 quantizer; the EMA quantizer updates its codebook
in the step), optional perceptual loss, optional hinge PatchGAN whose generator term is weighted adaptively
(||grad nll|| / ||grad gan|| at the decoder's last layer, as in taming-transformers) from `train.gan_start` on.
Codes unused for `train.restart_every` steps are re-seeded from encoder outputs of the current batch (at step 0
every code is, which initialises the codebook from data).

Workdir layout: a VQGAN folder (see `lvm.tokenizers.vqgan`: `config.yaml`, `checkpoints/`),
`tb/` (TensorBoard), `images/step_XXXXXXX.png` (originals left, reconstructions right), `skipped_videos.json`.

Bad videos (missing, empty, truncated, corrupt) never stop a run: training skips them (each one a line on stderr
and an entry of `skipped_videos.json`, see `JobReport`) and fails up front only when no video is readable;
evaluation leaves them out of the metrics and lists them in its result.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lvm.job_report import JobReport, attempt
from lvm.tokenizers import metrics, video
from lvm.tokenizers.config import VQGANConfig
from lvm.tokenizers.quantizer import restart_dead_codes
from lvm.tokenizers.vqgan import (
    VQGAN,
    VQGANTokenizer,
    checkpoint_manager,
    init_variables,
    save_config,
    to_pixels,
    to_uint8,
)


class PatchDiscriminator(nn.Module):
    """PatchGAN: stride-2 4x4 convs with GroupNorm and LeakyReLU, then a 1-channel patch logit map."""

    channels: int = 64
    layers: int = 3

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> [B, h, w, 1]
        h = nn.leaky_relu(nn.Conv(self.channels, (4, 4), strides=(2, 2))(x), 0.2)
        for i in range(1, self.layers):
            ch = self.channels * min(2**i, 8)
            h = nn.Conv(ch, (4, 4), strides=(2, 2))(h)
            h = nn.leaky_relu(nn.GroupNorm(min(32, ch // 4))(h), 0.2)
        return nn.Conv(1, (4, 4))(h)


def _optimizer(lr: float, warmup: int, tc) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup else lr
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, tc.b1, tc.b2, weight_decay=tc.weight_decay),
    )


class Trainer:
    """Holds the model, optimisers, mesh and jitted functions of one training run."""

    def __init__(self, cfg: VQGANConfig, devices=None):
        self.cfg = cfg
        mc, tc = cfg.model, cfg.train
        self.devices = list(devices or jax.local_devices())
        n = len(self.devices)
        self.batch_size = math.ceil(tc.batch_size / n) * n  # whole frames on every device
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.model = VQGAN(mc)
        self.disc = PatchDiscriminator(tc.disc_channels, tc.disc_layers)
        self.opt = _optimizer(tc.learning_rate, tc.warmup_steps, tc)
        self.disc_opt = _optimizer(tc.disc_learning_rate, 0, tc)
        self.perceptual = None
        if tc.perceptual_weight > 0:
            from lvm.tokenizers.perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss.from_npz(tc.perceptual_weights)
        self._step = {
            use_gan: jax.jit(
                functools.partial(self._train_step, use_gan=use_gan),
                in_shardings=(self.replicated, self.batch_sharding),
                out_shardings=(self.replicated, self.replicated, self.batch_sharding),
                donate_argnums=0,
            )
            for use_gan in (False, True)
        }
        self._restart = jax.jit(
            self._restart_step,
            in_shardings=(self.replicated, self.batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def init_state(self) -> dict:
        """Fresh training state (replicated on the mesh)."""
        mc, tc = self.cfg.model, self.cfg.train
        variables = init_variables(mc, tc.seed)
        x = jnp.zeros((1, mc.resolution, mc.resolution, 3))
        disc_params = self.disc.init(jax.random.key(tc.seed + 1), x)["params"]
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": variables["params"],
            "codebook": variables["codebook"],
            "opt_state": self.opt.init(variables["params"]),
            "disc_params": disc_params,
            "disc_opt_state": self.disc_opt.init(disc_params),
        }
        return jax.device_put(state, self.replicated)

    def step(self, state: dict, frames: np.ndarray, use_gan: bool):
        """One training step on uint8 frames `[batch, R, R, 3]` -> (state, scalar metrics, reconstructions)."""
        return self._step[use_gan](state, jax.device_put(frames, self.batch_sharding))

    def restart(self, state: dict, frames: np.ndarray, seed: int):
        """Re-seed unused codes from encoder outputs of `frames`; returns (state, number restarted)."""
        rng = jax.device_put(jax.random.key(seed), self.replicated)
        return self._restart(state, jax.device_put(frames, self.batch_sharding), rng)

    def _train_step(self, state, frames, use_gan: bool):
        tc = self.cfg.train
        x = to_pixels(frames)

        def losses(params):
            (rec, _, stats), mutated = self.model.apply(
                {"params": params, "codebook": state["codebook"]}, x, train=True, mutable=["codebook"]
            )
            err = jnp.abs(x - rec) if tc.recon_loss == "l1" else (x - rec) ** 2
            nll = jnp.mean(err)
            if self.perceptual is not None:
                nll = nll + tc.perceptual_weight * self.perceptual(x, rec)
            vq = stats["commitment"] + tc.codebook_weight * stats["codebook"]
            gan = (
                -jnp.mean(self.disc.apply({"params": state["disc_params"]}, rec))
                if use_gan
                else jnp.zeros(())
            )
            return (nll, vq, gan), (rec, mutated["codebook"], stats)

        (nll, vq, gan), vjp, (rec, codebook, stats) = jax.vjp(losses, state["params"], has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        (grads,) = vjp((one, one, zero))
        out = {"loss/nll": nll, "loss/vq": vq}
        if use_gan:
            (gan_grads,) = vjp((zero, zero, one))
            last = lambda g: g["decoder"]["conv_out"]["kernel"]  # noqa: E731
            weight = jnp.linalg.norm(last(grads)) / (jnp.linalg.norm(last(gan_grads)) + 1e-4)
            weight = tc.gan_weight * jax.lax.stop_gradient(jnp.clip(weight, 0.0, 1e4))
            grads = jax.tree.map(lambda g, h: g + weight * h, grads, gan_grads)
            out |= {"loss/gan": gan, "gan_weight": weight}
        updates, opt_state = self.opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(state, step=state["step"] + 1, params=params, codebook=codebook, opt_state=opt_state)

        if use_gan:

            def disc_loss(dp):
                real = self.disc.apply({"params": dp}, x)
                fake = self.disc.apply({"params": dp}, jax.lax.stop_gradient(rec))
                return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))

            d_loss, d_grads = jax.value_and_grad(disc_loss)(state["disc_params"])
            d_updates, d_opt = self.disc_opt.update(d_grads, state["disc_opt_state"], state["disc_params"])
            new_state |= {
                "disc_params": optax.apply_updates(state["disc_params"], d_updates),
                "disc_opt_state": d_opt,
            }
            out["loss/disc"] = d_loss

        rec_u8 = to_uint8(rec)
        out |= {
            "psnr": jnp.mean(metrics.psnr(frames, rec_u8)),
            "ssim": jnp.mean(metrics.ssim(frames, rec_u8)),
            "perplexity": stats["perplexity"],
            "batch_usage": stats["batch_usage"],
        }
        return new_state, out, rec_u8

    def _restart_step(self, state, frames, rng):
        variables = {"params": state["params"], "codebook": state["codebook"]}
        latents = self.model.apply(variables, to_pixels(frames), method=VQGAN.latents)
        latents = latents.reshape(-1, latents.shape[-1])
        if self.cfg.model.quantizer == "l2":
            quant = {"params": state["params"]["quantizer"], "codebook": state["codebook"]["quantizer"]}
        else:
            quant = {"codebook": state["codebook"]["quantizer"]}
        new, n_dead = restart_dead_codes(quant, latents, rng, self.cfg.model.quantizer)
        state = dict(state, codebook=dict(state["codebook"], quantizer=new["codebook"]))
        if "params" in new:
            state["params"] = dict(state["params"], quantizer=new["params"])
        return state, n_dead


# Checkpoints ------------------------------------------------------------------------------------------------


def _items(state: dict, arg) -> ocp.args.Composite:
    """The checkpoint items of a state: `model` (params + codebook) and `train` (the rest), each wrapped in `arg`."""
    model = {"params": state["params"], "codebook": state["codebook"]}
    return ocp.args.Composite(model=arg(model), train=arg({k: v for k, v in state.items() if k not in model}))


# Training loop ----------------------------------------------------------------------------------------------

SKIPPED_VIDEOS = "skipped_videos.json"  # in the workdir: the videos training could not read


def _image_grid(originals: np.ndarray, recons: np.ndarray, max_rows: int = 8) -> np.ndarray:
    """uint8 grid: one row per frame, original on the left, reconstruction on the right."""
    rows = [
        np.concatenate([o, r], axis=1) for o, r in zip(originals[:max_rows], recons[:max_rows], strict=True)
    ]
    return np.concatenate(rows, axis=0)


def train(
    cfg: VQGANConfig,
    videos: str | os.PathLike,
    steps: int,
    workdir: str | os.PathLike,
    devices=None,
    progress: bool = True,
) -> dict[str, float]:
    """Train (or resume, when `workdir` has a checkpoint) until `steps` total steps; returns the last metrics and
    `skipped_videos`, the number of unreadable videos left out (listed in `workdir/skipped_videos.json`)."""
    paths = video.list_videos(videos)
    workdir = Path(workdir)
    save_config(cfg, workdir)
    skipped = JobReport("lvm train-vqgan", workdir / SKIPPED_VIDEOS, lambda: {"videos": len(paths)})
    with skipped:
        lengths = video.readable_videos(paths, skipped)
        last = _train(cfg, lengths, steps, workdir, devices, progress, skipped)
    return {**last, "skipped_videos": len(skipped.failures)}


def _train(cfg, lengths, steps, workdir, devices, progress, skipped) -> dict[str, float]:
    """The training loop over the readable videos (`lengths`: path -> frame count); the last metrics."""
    from PIL import Image
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    tc = cfg.train
    trainer = Trainer(cfg, devices)
    state = trainer.init_state()
    mngr = checkpoint_manager(workdir)
    start = mngr.latest_step() or 0
    if start:
        restored = mngr.restore(start, args=_items(state, ocp.args.StandardRestore))
        state = jax.device_put({**restored["model"], **restored["train"]}, trainer.replicated)
    frames_iter = video.sample_frames(
        list(lengths), trainer.batch_size, tc.frames_per_video, cfg.model.resolution, tc.seed + start,
        lengths, skipped,
    )  # fmt: skip
    writer = SummaryWriter(str(workdir / "tb"))
    (workdir / "images").mkdir(exist_ok=True)
    last: dict[str, float] = {}
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="train-vqgan")
    for step in bar:
        frames = next(frames_iter)
        if tc.restart_every and step % tc.restart_every == 0:
            state, n_dead = trainer.restart(state, frames, seed=tc.seed + step)
            writer.add_scalar("codes_restarted", int(n_dead), step)
        use_gan = tc.gan_weight > 0 and step >= tc.gan_start
        state, out, rec = trainer.step(state, frames, use_gan)
        done = step + 1
        if done % tc.log_every == 0 or done == steps:
            last = {k: float(v) for k, v in out.items()}
            for k, v in last.items():
                writer.add_scalar(k, v, done)
            bar.set_postfix(
                psnr=f"{last['psnr']:.2f}", usage=f"{last['batch_usage']:.2f}", loss=f"{last['loss/nll']:.3f}"
            )
        if done % tc.image_every == 0 or done == steps:
            grid = _image_grid(frames, np.asarray(rec))
            Image.fromarray(grid).save(workdir / "images" / f"step_{done:07d}.png")
            writer.add_image("originals_vs_reconstructions", grid, done, dataformats="HWC")
        if done % tc.checkpoint_every == 0 or done == steps:
            mngr.save(done, args=_items(state, ocp.args.StandardSave))
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    return last


def evaluate(
    tokenizer: VQGANTokenizer,
    videos: str | os.PathLike,
    frames_per_video: int = 16,
    report: JobReport | None = None,
) -> dict[str, Any]:
    """Reconstruction PSNR and SSIM (mean over frames) and codebook usage/perplexity over a folder of videos.
    With `report`, an unreadable video is recorded there and left out (`ValueError` when none is readable);
    without it, its `VideoError` is raised."""
    paths = video.list_videos(videos)
    psnrs, ssims = [], []
    counts = np.zeros(tokenizer.cfg.codebook_size, np.int64)
    for path in paths:
        read = functools.partial(video.evenly_spaced_frames, path, frames_per_video, tokenizer.cfg.resolution)
        frames = attempt(report, path, read)
        if frames is None:
            continue
        codes = tokenizer.encode(frames)
        recon = tokenizer.decode(codes)
        psnrs.append(np.asarray(metrics.psnr(frames, recon)))
        ssims.append(np.asarray(metrics.ssim(frames, recon)))
        counts += np.bincount(codes.reshape(-1), minlength=len(counts))
    if not psnrs:
        raise ValueError(f"none of the {len(paths)} videos in {videos} could be read")
    psnr_all, ssim_all = np.concatenate(psnrs), np.concatenate(ssims)
    return {
        "psnr": float(psnr_all.mean()),
        "ssim": float(ssim_all.mean()),
        **metrics.code_stats(counts),
        "videos": len(psnrs),
        "frames": int(len(psnr_all)),
        "codebook_size": int(tokenizer.cfg.codebook_size),
    }
