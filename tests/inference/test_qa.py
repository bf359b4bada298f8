"""`lvm qa`, `lvm generate` and the inference API end to end, on the tiny model of conftest.py's `trained` fixture."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvm.cli import main
from lvm.commands.generate import write_frames
from lvm.generation import Sampling
from lvm.inference import GREEDY, load_model
from lvm.tokenizers import format as fmt

pytestmark = [
    pytest.mark.slow,  # every test needs the tiny red/blue model (the `trained` fixture: trained once a session)
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


def test_questions_file_and_clear_errors(trained, tmp_path, question, gcs_server):
    from lvm.data_pipeline import storage

    lines = [json.dumps({"question": question}), "", json.dumps({"question": question})]
    storage.write_bytes("gs://test/q.jsonl", "\n".join(lines).encode())  # gs:// like a local file
    out = lvm("qa", "--checkpoint", str(trained / "export"), "--video", str(trained / "held_out_blue.mp4"),
              "--questions", "gs://test/q.jsonl", "--max-new-tokens", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    answers = [json.loads(x) for x in out.stdout.splitlines()]  # stdout is JSONL, nothing else
    assert answers == [{"question": question, "answer": "Blue."}] * 2, out.stdout
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


def test_bad_questions_and_tokenizers_name_their_cause(trained, tmp_path, question, capsys):
    """Run in this process (`lvm.cli.main`, as the console script does): every case fails before decoding."""
    export, video = str(trained / "export"), str(trained / "held_out_red.mp4")

    def qa(*args):
        code = main(["qa", "--checkpoint", export, "--video", video, *args])
        return code, capsys.readouterr()

    (tmp_path / "q.txt").write_text("What colour is the video?\n")
    code, out = qa("--questions", str(tmp_path / "q.txt"))
    assert code == 2 and f"{tmp_path / 'q.txt'}:1: not JSON" in out.err and out.out == "", out.err
    code, out = qa("--questions", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "--questions" in out.err and "missing.jsonl" in out.err, out.err
    long = "red " * 300
    (tmp_path / "q.jsonl").write_text(f'{{"question": "{question}"}}\n\n{{"question": "{long}"}}\n')
    code, out = qa("--questions", str(tmp_path / "q.jsonl"))
    assert code == 2 and "the question" in out.err and "too long" in out.err, out.err
    assert "q.jsonl:3: 'red red" in out.err and "--max-new-tokens" in out.err and "reserved" not in out.err
    code, out = qa("--question", long)
    assert code == 2 and "(--question: 'red red" in out.err and "too long" in out.err, out.err

    untokenized = tmp_path / "untokenized"  # an export whose tokenizers.json is {} (a synthetic-data model)
    untokenized.mkdir()
    for item in (trained / "export").iterdir():
        (untokenized / item.name).symlink_to(item)
    (untokenized / "tokenizers.json").unlink()
    (untokenized / "tokenizers.json").write_text("{}")
    export = str(untokenized)
    code, out = qa("--question", question)
    assert code == 2 and "--text-tokenizer PATH" in out.err, out.err
    assert "without a recorded tokenizer" in out.err


def test_sampling_never_decodes_an_id_beyond_the_tokenizer(trained, capsys):
    """The model's text vocabulary is padded to 512, its tokenizer has 400 pieces: hot sampling picked a padded
    id (within 8 tokens for seeds 0 and 1) and ended in `IndexError: piece id is out of range`."""
    for seed in range(2):
        argv = ["generate", "--checkpoint", str(trained / "export"), "--prompt", "In the beginning",
                "--temperature", "3", "--seed", str(seed), "--max-new-tokens", "12"]  # fmt: skip
        assert main(argv) == 0
        assert capsys.readouterr().out.strip()
    model = load_model(trained / "export")
    assert model.codec.vocab_size < model.cfg.model.text_vocab_size
    ctx = model.video_context(np.zeros((2, 8, 8), np.int32), 64)
    for seed in range(2):  # answers sample through the same mask
        model.answer(ctx, "In the beginning", max_new_tokens=12, sampling=Sampling(3.0), seed=seed)


def test_option_likelihoods_are_over_the_tokenizers_vocabulary(trained):
    model = load_model(trained / "export")
    vocab = model.codec.vocab_size
    logits = np.random.default_rng(0).normal(size=model.cfg.model.text_vocab_size).astype(np.float32)
    logits[vocab:] = 50.0  # padded rows no tokenizer id names: they must not take probability
    reference = logits[:vocab] - np.log(np.exp(logits[:vocab].astype(np.float64)).sum())
    for token in (0, 7, vocab - 1):
        assert model._answer_logprob(logits, None, [token]) == pytest.approx(reference[token], abs=1e-5)


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


def test_generate_checks_its_output_first_and_writes_animations(trained, tmp_path, capsys):
    export = str(trained / "export")

    def generate(*args, checkpoint=export):
        code = main(["generate", "--checkpoint", checkpoint, "--prompt", "a red video", *args])
        return code, capsys.readouterr()

    nope = str(tmp_path / "nope")  # refused before the model is loaded: the checkpoint does not exist
    code, out = generate("--output", str(tmp_path / "no" / "such" / "x.mp4"), checkpoint=nope)
    assert code == 2 and "--output" in out.err and "does not exist" in out.err, out.err
    code, out = generate("--output", str(tmp_path / "x.png"), "--frames", "3", checkpoint=nope)
    assert code == 2 and ".gif" in out.err and ".mp4" in out.err, out.err
    code, out = generate("--output", str(tmp_path / "x.jpg"), checkpoint=nope)
    assert code == 2 and ".png" in out.err, out.err
    code, out = generate("--output", str(tmp_path / "x.gif"), "--frames", "5")  # 5 x 65 tokens > 256
    assert code == 2 and "fewer --frames" in out.err and "--max-frames" not in out.err, out.err

    code, out = generate("--output", str(tmp_path / "red.gif"), "--frames", "2", "--temperature", "1")
    assert code == 0 and out.out.strip() == str(tmp_path / "red.gif"), out.err
    gif = Image.open(tmp_path / "red.gif")
    assert gif.n_frames == 2 and gif.size == (32, 32) and gif.info["duration"] == 250  # animated at --fps 4
    frames = []
    for i in range(2):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    with warnings.catch_warnings(record=True) as caught:  # the mp4 writer `generate --output x.mp4` calls
        warnings.simplefilter("always")
        write_frames(np.stack(frames), str(tmp_path / "red.mp4"), 4.0)
    assert not [w for w in caught if "fork" in str(w.message)], caught  # ffmpeg starts without os.fork()
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(tmp_path / "red.mp4"))
    assert next(reader)["size"] == (32, 32) and sum(1 for _ in reader) == 2
    reader.close()


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
