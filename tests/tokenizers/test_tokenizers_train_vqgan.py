"""VQGAN training on real mp4 frames: held-out PSNR and codebook usage, checkpoints, images, resume + GAN, eval.

The tiny config is trained at 32x32 (overrides below) so the whole test stays near a minute on two shared CPU
cores: 300 steps of 8 frames from 24 moving-pattern h264 videos at four resolutions (decoded with decord,
resized and centre-cropped), evaluated on 4 videos it never saw.
"""

import json

import numpy as np
import pytest

from lvm import cli
from lvm.tokenizers import metrics, synthetic, video

SIZES = [(64, 96), (128, 128), (90, 160), (72, 128)]  # (height, width) of the test videos
OVERRIDES = [
    "model.resolution=32",
    "model.channel_mult=1,2,2",  # 8x8 codes per frame
    "train.batch_size=8",
    "train.frames_per_video=2",
    "train.checkpoint_every=150",
    "train.image_every=150",
]
STEPS = 300
# Measured: 17.40 dB and 0.84 (deterministic seeds); 256 codes of 4x4 patches in random colours bound the PSNR.
MIN_HELDOUT_PSNR = 16.0  # dB on frames of unseen videos
MIN_CODEBOOK_USAGE = 0.5  # share of the 256 codes used on those frames


# imageio-ffmpeg starts ffmpeg with fork+exec after jax is imported; the exec makes JAX's warning moot.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    synthetic.write_dataset(root / "train", SIZES * 6, frames=16, seed=0)
    synthetic.write_dataset(root / "heldout", SIZES, frames=16, seed=1000)
    return root


def test_video_reading_and_manifest(videos, tmp_path):
    paths = video.list_videos(videos / "train")
    assert len(paths) == 24
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(paths[:2]) + "\n# comment\n")
    assert video.list_videos(manifest) == paths[:2]
    frames = video.read_frames(paths[2], [0, 3], 48)  # a 160x90 video: short side to 48, centre crop
    assert frames.shape == (2, 48, 48, 3) and frames.dtype == np.uint8
    src = synthetic.moving_pattern(90, 160, 16, seed=2)[[0, 3]]
    from PIL import Image

    ref = np.stack([np.asarray(Image.fromarray(f).resize((85, 48), Image.BICUBIC))[:, 18:66] for f in src])
    assert float(np.mean(metrics.psnr(frames, ref))) > 25  # h264 round trip + same resize
    with pytest.raises(FileNotFoundError):
        video.list_videos(tmp_path / "missing")


def test_sample_frames_fills_exact_batches(videos):
    paths = video.list_videos(videos / "train")[:3]
    batches = video.sample_frames(paths, batch_size=5, frames_per_video=2, resolution=16, seed=0)
    for _ in range(3):
        batch = next(batches)
        assert batch.shape == (5, 16, 16, 3) and batch.dtype == np.uint8
    again = next(video.sample_frames(paths, batch_size=5, frames_per_video=2, resolution=16, seed=0))
    first = next(video.sample_frames(paths, batch_size=5, frames_per_video=2, resolution=16, seed=0))
    np.testing.assert_array_equal(again, first)  # seeded
    frames = video.evenly_spaced_frames(paths[0], 40, 16)  # more than the video has: all 16 frames
    assert frames.shape == (16, 16, 16, 3)


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + 5, 0, 255)
    mse = np.mean((a.astype(float) - b) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(metrics.psnr(a, b), 10 * np.log10(255**2 / mse), rtol=1e-5)
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-5)
    smooth = synthetic.moving_pattern(32, 32, 2, seed=0)
    slightly, very = (np.clip(smooth + rng.normal(0, s, smooth.shape), 0, 255) for s in (5, 40))
    assert np.all(metrics.ssim(smooth, very) < metrics.ssim(smooth, slightly)) and np.all(
        metrics.ssim(smooth, slightly) < 1
    )
    assert metrics.code_stats(np.array([2, 2, 0, 0])) == {
        "codebook_usage": 0.5,
        "perplexity": pytest.approx(2.0),
    }


@pytest.mark.slow
def test_train_eval_resume_with_gan(videos, tmp_path):
    workdir = tmp_path / "run"
    base = ["--config", "tiny", "--videos", str(videos / "train"), "--workdir", str(workdir), "--no-progress"]
    assert cli.run_command("train-vqgan", [*base, "--steps", str(STEPS), "--set", *OVERRIDES]) == 0
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(workdir), "--videos", str(videos / "heldout"), "--out", str(out)]
    assert cli.run_command("eval-vqgan", argv) == 0
    result = json.loads(out.read_text())
    print("held-out:", result)
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= set(result)
    assert result["frames"] == 4 * 16
    assert result["psnr"] >= MIN_HELDOUT_PSNR
    assert result["codebook_usage"] >= MIN_CODEBOOK_USAGE
    assert sorted(p.name for p in (workdir / "images").glob("*.png")) == [
        "step_0000150.png",
        "step_0000300.png",
    ]
    assert any((workdir / "tb").iterdir())

    # Resume at step 300 with the hinge GAN switched on from there: runs only the missing steps.
    gan = ["train.gan_weight=0.1", f"train.gan_start={STEPS}", "train.log_every=1"]
    assert cli.run_command("train-vqgan", [*base, "--steps", str(STEPS + 2), "--set", *OVERRIDES, *gan]) == 0
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == STEPS + 2


def test_bad_workdir_and_videos(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        cli.run_command(
            "eval-vqgan", ["--checkpoint", str(tmp_path), "--videos", str(tmp_path), "--out", "x.json"]
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        cli.run_command("train-vqgan", ["--config", "tiny", "--videos", str(tmp_path / "empty"), "--steps", "1",
                                    "--workdir", str(tmp_path / "w")])  # fmt: skip
