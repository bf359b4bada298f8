"""VQGAN training on real mp4 frames: held-out PSNR and codebook usage, checkpoints, images, resume + GAN, eval.

The tiny config is trained at 32x32 (overrides below) so the whole test stays near a minute on two shared CPU
cores: 300 steps of 8 frames from 24 moving-pattern h264 videos at four resolutions (decoded with decord,
resized and centre-cropped), evaluated on 4 videos it never saw.
"""

import json
import os

import numpy as np
import pytest

from lvm import cli
from lvm.job_report import EXIT_BAD_INPUTS
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


TINY = ["model.resolution=32", "model.channel_mult=1,2", "train.batch_size=2", "train.restart_every=0"]


def good_and_truncated(folder):
    """Two good 32x32 mp4s and `truncated.mp4` (the first one's first half) in `folder`."""
    good = synthetic.write_dataset(folder, [(32, 32)] * 2, frames=4, seed=0)
    data = open(good[0], "rb").read()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return good


def test_train_vqgan_skips_bad_videos(tmp_path, capsys):
    """A truncated mp4 in the training folder: trains on the good videos, names and lists the bad one, exits 3;
    with no readable video it stops before training."""
    folder = tmp_path / "videos"
    good = good_and_truncated(folder)
    argv = ["train-vqgan", "--config", "tiny", "--steps", "1", "--no-progress", "--set", *TINY, "--videos"]
    assert cli.main([*argv, str(folder), "--workdir", str(tmp_path / "run")]) == EXIT_BAD_INPUTS
    out, err = capsys.readouterr()
    assert json.loads(out)["skipped_videos"] == 1 and "loss/nll" in json.loads(out)
    assert f"cannot read the video {folder / 'truncated.mp4'}: " in err and "skipped" in err
    skipped = json.loads((tmp_path / "run" / "skipped_videos.json").read_text())
    assert skipped["complete"] and skipped["videos"] == 3 and skipped["failed"] == 1
    assert skipped["failures"][0]["input"] == str(folder / "truncated.mp4")
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()  # trained on the two good videos

    (folder / "empty.mp4").write_bytes(b"")
    for path in good:
        os.remove(path)
    assert cli.main([*argv, str(folder), "--workdir", str(tmp_path / "w2")]) == 2
    err = capsys.readouterr().err
    assert "empty file" in err and "none of the 2 videos could be read" in err
    assert not (tmp_path / "w2" / "checkpoints").exists()


def test_eval_vqgan_lists_bad_videos(tmp_path, capsys):
    """A manifest naming a good, a truncated and a missing video: the report scores the good one and lists the
    others with their causes; exit 3."""
    from lvm.tokenizers.config import load_config
    from lvm.tokenizers.vqgan import init_variables, save_model

    cfg = load_config("tiny", TINY)
    save_model(cfg, init_variables(cfg.model), tmp_path / "vqgan")
    good = good_and_truncated(tmp_path / "videos")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{good[1]}\nvideos/truncated.mp4\nmissing.mp4\n")
    report = tmp_path / "eval.json"
    argv = [
        "eval-vqgan",
        "--checkpoint",
        str(tmp_path / "vqgan"),
        "--videos",
        str(manifest),
        "--out",
        str(report),
    ]
    assert cli.main([*argv, "--frames-per-video", "2"]) == EXIT_BAD_INPUTS
    result = json.loads(report.read_text())
    assert result["complete"] and result["videos"] == 1 and result["frames"] == 2 and result["psnr"] > 0
    bad = [str(tmp_path / "videos" / "truncated.mp4"), str(tmp_path / "missing.mp4")]
    assert [f["input"] for f in result["failures"]] == bad and result["failed"] == 2
    assert "not found" in result["failures"][1]["error"]
    err = capsys.readouterr().err
    assert err.count("(skipped, listed in") == 2 and all(path in err for path in bad)
