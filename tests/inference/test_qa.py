"""`lvm qa`, `lvm generate` and the inference API end to end, on the model of `qa_assets.trained`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvm.inference import GREEDY, load_model
from lvm.tokenizers import format as fmt

pytestmark = [
    pytest.mark.slow,  # every test trains the tiny red/blue model first (the `trained` fixture)
    pytest.mark.xdist_group("qa"),
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
]
REPO = Path(__file__).resolve().parents[2]


def lvm(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return subprocess.run(
        [sys.executable, "-m", "lvm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_qa_answers_about_a_real_mp4(trained, question):
    for colour in ("red", "blue"):
        out = lvm("qa", "--checkpoint", str(trained / "export"), "--video", str(trained / f"held_out_{colour}.mp4"),
                  "--question", question, "--max-new-tokens", "8")  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == f"{colour.capitalize()}.", out.stdout
        assert "frames" in out.stderr  # the video's size and the streamed answer go to stderr


def test_questions_file_and_clear_errors(trained, tmp_path, question):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question": question}) + "\n" + json.dumps({"question": question}) + "\n"
    )
    out = lvm("qa", "--checkpoint", str(trained / "export"), "--video", str(trained / "held_out_blue.mp4"),
              "--questions", str(questions), "--max-new-tokens", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [json.loads(x)["answer"] for x in lines[:2]] == ["Blue.", "Blue."] and lines[-1] == "Blue."
    assert out.stderr.count("video:") == 1  # encoded once for both questions

    missing = lvm("qa", "--checkpoint", str(tmp_path / "nope"), "--video", "x.mp4", "--question", "q")
    assert missing.returncode == 2 and "no model at" in missing.stderr
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    broken = lvm("qa", "--checkpoint", str(trained / "export"), "--video", str(tmp_path / "broken.mp4"),
                 "--question", question)  # fmt: skip
    assert broken.returncode == 2 and "broken.mp4" in broken.stderr and "Traceback" not in broken.stderr
    too_long = lvm(
        "qa",
        "--checkpoint",
        str(trained / "export"),
        "--video",
        str(trained / "held_out_red.mp4"),
        "--question",
        question,
        "--fps",
        "4",
    )  # 6 frames x 65 tokens > the 256-token context
    assert too_long.returncode == 2, too_long.stderr[-2000:]
    assert "context is 256" in too_long.stderr and "--max-frames" in too_long.stderr


def test_default_frames_fill_the_context_and_options_score_by_likelihood(trained, question):
    model = load_model(trained / "export")
    room = 64
    n = model.frames_that_fit(room)
    prefix = model.tokens(fmt.video_first_prefix(fmt.Video(np.zeros((n, 8, 8), np.int32))))
    assert len(prefix) + room <= 256 < len(prefix) + room + model.frame_tokens()
    codes = model.read_video(str(trained / "held_out_red.mp4"), reserve=room)
    assert len(codes) == min(n, 6)  # as many as fit (the video has 6 frames)
    ctx = model.video_context(codes[:2], room)
    red, blue = model.option_logprobs(ctx, question, ["Red.", "Blue."])
    assert red > blue
    # the prefix cache is reused: asking twice gives the same answer, the cache is unchanged
    assert (
        model.answer(ctx, question, max_new_tokens=8)
        == model.answer(ctx, question, max_new_tokens=8)
        == "Red."
    )


def test_read_videos_match_one_at_a_time_and_name_a_bad_file(trained, tmp_path):
    from lvm.data_pipeline.decode import DecodeConfig, Decoder

    model = load_model(trained / "export")
    red, blue = (str(trained / f"held_out_{colour}.mp4") for colour in ("red", "blue"))
    with Decoder(DecodeConfig(resolution=32, num_frames=6)) as decoder:  # reference: one video at a time
        expected = [model.vqgan.encode(decoder.decode(uri)[0]) for uri in (red, blue, red)]
    together = list(model.read_videos([red, blue, red], num_frames=6))
    assert len(together) == 3 and not np.array_equal(together[0], together[1])
    for got, want in zip(together, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    videos = model.read_videos([red, str(tmp_path / "broken.mp4"), blue], num_frames=6)
    np.testing.assert_array_equal(next(videos), expected[0])
    with pytest.raises(ValueError, match="broken.mp4"):
        next(videos)


def test_generate_writes_an_image_and_guidance_follows_the_prompt(trained, tmp_path):
    out = lvm("generate", "--checkpoint", str(trained / "export"), "--prompt", "a red video",
              "--output", str(tmp_path / "red.png"), "--temperature", "1", "--top-k", "20")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "red.png")).shape == (32, 32, 3)
    model = load_model(trained / "export")
    seen = {}
    for colour in ("red", "blue"):
        frames = model.read_video(str(trained / f"held_out_{colour}.mp4"), num_frames=6)
        seen[colour] = set(frames.ravel().tolist())
    for colour, other in (("red", "blue"), ("blue", "red")):
        codes = model.generate_codes(f"a {colour} video", 1, guidance=3.0, sampling=GREEDY).ravel()
        assert np.isin(codes, list(seen[colour])).mean() > np.isin(codes, list(seen[other])).mean(), colour
