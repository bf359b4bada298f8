"""A video too long for the context is rejected before it is decoded, with a message that names the video, the
tokens it needs against the context and the flag to change; a still image is read as a one-frame video. On an
untrained tiny model (256-token context, 8x8 codes: 65 tokens a frame), built in a few seconds."""

import re

import jax
import numpy as np
import pytest
from conftest import tiny_tokenizers
from PIL import Image

from lvm import checkpoint
from lvm.cli import main
from lvm.config import load_config
from lvm.data_pipeline.decode import Decoder
from lvm.inference import load_model
from lvm.model import init_params
from lvm.sharding import make_mesh
from lvm.tokenizers import format as fmt
from lvm.tokenizers import synthetic
from lvm.tokenizers.video import resize_crop

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
RESERVE = 64  # tokens kept for the question and answer


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export folder of a randomly initialised tiny model with its SentencePiece model and VQGAN."""
    root = tmp_path_factory.mktemp("length")
    tok = tiny_tokenizers(root)
    cfg = load_config(["model/tiny"], ["mesh=1,8,1,1", "train.seq_len=256", "model.text_vocab_size=400"])
    params = init_params(cfg, make_mesh(cfg.mesh), jax.random.key(0))
    tokenizers = {"text_tokenizer": tok.model_file, "vqgan": str(root / "vqgan")}
    checkpoint.export(root / "export", params, cfg, tokenizers)
    synthetic.write_video(root / "long.mp4", synthetic.moving_pattern(32, 32, 40, seed=0), fps=8)  # 5 s
    return root / "export"


@pytest.fixture(scope="module")
def model(export):
    return load_model(export)


@pytest.fixture
def messages(monkeypatch):
    """The kinds of the messages every Decoder receives from its worker during the test ("decoded", "info" and
    "chunk" come only after the worker decoded frames)."""
    kinds = []
    recv = Decoder._recv

    def spy(self):
        message = recv(self)
        kinds.append(message[0])
        return message

    monkeypatch.setattr(Decoder, "_recv", spy)
    return kinds


def test_too_many_frames_at_an_fps_fail_before_decoding(model, export, messages, monkeypatch):
    video = str(export.parent / "long.mp4")  # 40 frames at 8 fps
    fit = model.frames_that_fit(RESERVE)
    assert 1 <= fit < 40
    encoded = []
    monkeypatch.setattr(model.vqgan, "encode", lambda frames: encoded.append(frames))
    with pytest.raises(ValueError) as err:
        model.read_video(video, fps=8, reserve=RESERVE)
    message = str(err.value)
    need = fmt.prefix_overhead(model.codec) + 40 * model.frame_tokens() + RESERVE
    assert f"{video} (5.0 s at --fps 8): 40 frames need {need} tokens" in message, message
    assert "the model's context is 256" in message and f"--max-frames {fit}" in message, message
    assert messages == ["too_many"] and not encoded  # the worker read the metadata and decoded no frame
    monkeypatch.undo()
    # the rate the message suggests reads the video, and the result fits with the reserve to spare
    suggested = float(re.search(r"use --fps ([0-9.]+)", message).group(1))
    codes = model.read_video(video, fps=suggested, reserve=RESERVE)
    assert 1 <= len(codes) <= fit
    model.video_context(codes, RESERVE)
    # without a reserve the caller only wants codes: no check (e.g. a haystack of frames to splice)
    assert len(model.read_video(video, fps=8)) == 40


def test_too_many_frames_asked_for_fail_without_opening_the_video(model, monkeypatch):
    def no_decoder(*args, **kwargs):
        raise AssertionError("a decoder was started")

    monkeypatch.setattr(Decoder, "__init__", no_decoder)
    fit = model.frames_that_fit(RESERVE)
    missing = "/nonexistent/clip.mp4"  # never opened: the count is known from the flags alone
    with pytest.raises(
        ValueError, match=rf"clip.mp4 \(--num-frames 50\): 50 frames need .*use --num-frames {fit}"
    ):
        model.read_video(missing, num_frames=50, reserve=RESERVE)
    with pytest.raises(
        ValueError, match=rf"\(--max-frames 20\): 20 frames .*use --max-frames {fit} or fewer"
    ):
        model.read_video(missing, num_frames=50, max_frames=20, reserve=RESERVE)


def test_qa_rejects_a_long_video_before_decoding_and_names_the_flags(export, messages, capsys):
    video = str(export.parent / "long.mp4")
    argv = ["qa", "--checkpoint", str(export), "--video", video, "--question", "What moves?", "--fps", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"lvm qa: error: {video} (5.0 s at --fps 8): 40 frames need" in err, err
    assert "the model's context is 256: use --fps" in err and "--max-frames" in err, err
    assert "too_many" in messages and "chunk" not in messages and "Traceback" not in err


def test_a_still_image_is_a_one_frame_video(model, export, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    codes = model.read_video(str(tmp_path / "photo.png"), reserve=RESERVE)
    np.testing.assert_array_equal(codes, model.vqgan.encode(resize_crop(pixels[None], 32)))  # as video frames
    assert len(model.read_video(str(tmp_path / "photo.png"), fps=30, num_frames=2, reserve=RESERVE)) == 1
    argv = ["qa", "--checkpoint", str(export), "--video", str(tmp_path / "photo.png"),
            "--question", "What is it?", "--max-new-tokens", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "video: 1 frame" in capsys.readouterr().err
