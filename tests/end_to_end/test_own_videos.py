"""The path of docs/own-videos.md at toy scale: a folder of your own mp4s and a JSONL of questions and answers ->
`lvm pretokenize` -> `lvm train --config CHECKPOINT/config.yaml --config finetune/own_videos --init-from
CHECKPOINT` -> `lvm export` -> `lvm eval-qa` and `lvm chat`'s answers. The start is the tiny red/blue model of the
`trained` fixture; the new videos are green or yellow and the question is new, so it cannot answer them before
fine-tuning and must after."""

import json

import numpy as np
import pytest

from lvm.checkpoint import read_tokenizers
from lvm.cli import main
from lvm.tokenizers.synthetic import write_video

pytestmark = [
    pytest.mark.slow,  # trains the tiny model (the `trained` fixture), then fine-tunes it
    pytest.mark.xdist_group("own_videos"),
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
]
COLOURS = {"Green": (40, 200, 40), "Yellow": (220, 210, 30)}
QUESTION = "Which colour fills this clip?"
TRAIN_VIDEOS, HELD_OUT = 32, 24
# toy scale: 40 steps at the tiny model's larger learning rate (it was trained at 1e-2) instead of the config's
TOY = ["--set", "train.steps=40", "--set", "train.lr=5e-3", "--set", "train.end_lr=5e-4"]


def own_video(path, rgb, seed):
    """A clip of 6 noisy frames of one colour at 4 fps, as a phone would not film it."""
    rng = np.random.default_rng(seed)
    frames = np.array(rgb, np.int16)[None, None, None] + rng.integers(-25, 25, (6, 32, 32, 3))
    write_video(path, np.clip(frames, 0, 255).astype(np.uint8), fps=4)


def lvm(*argv, capsys) -> str:
    """Run `lvm ARGV` in this process; its stdout."""
    capsys.readouterr()
    assert main(list(argv)) == 0, capsys.readouterr().err[-3000:]
    return capsys.readouterr().out


def eval_accuracy(checkpoint, data, video_dir, out, capsys) -> float:
    lvm("eval-qa", "--checkpoint", str(checkpoint), "--data", str(data), "--video-dir", str(video_dir),
        "--out", str(out), "--num-frames", "2", "--no-progress", capsys=capsys)  # fmt: skip
    report = json.loads(out.read_text())
    assert report["scored"] == HELD_OUT and report["failed"] == 0, report["overall"]
    return report["overall"]["loglik"]


def test_fine_tuning_on_your_own_videos_teaches_the_model_to_answer(trained, tmp_path, capsys):
    start = trained / "export"
    own = tmp_path / "own-videos"
    names = list(COLOURS)
    # 1. your videos and questions: training clips with a manifest, held-out clips in the Video-MME layout
    (own / "videos" / "train").mkdir(parents=True)
    (own / "videos" / "eval").mkdir(parents=True)
    with open(own / "train.jsonl", "w") as f:
        for i in range(TRAIN_VIDEOS):
            colour = names[i % 2]
            own_video(own / "videos" / "train" / f"{i:03d}.mp4", COLOURS[colour], seed=i)
            qa = [{"question": QUESTION, "answer": f"{colour}."}]
            f.write(json.dumps({"video": f"videos/train/{i:03d}.mp4", "qa": qa}) + "\n")
    with open(own / "eval.jsonl", "w") as f:
        for i in range(HELD_OUT):
            colour = names[i % 2]
            own_video(own / "videos" / "eval" / f"{i:03d}.mp4", COLOURS[colour], seed=1000 + i)
            options = [f"{chr(65 + k)}. {name}." for k, name in enumerate(names)]
            item = {"videoID": f"{i:03d}", "video": f"eval/{i:03d}.mp4", "question": QUESTION,
                    "options": options, "answer": chr(65 + names.index(colour))}  # fmt: skip
            f.write(json.dumps(item) + "\n")

    # 2. pretokenize with the checkpoint's own tokenizers (its tokenizers.json names them)
    tokenizers = read_tokenizers(start)
    out = lvm("pretokenize", "--manifest", str(own / "train.jsonl"), "--output", str(own / "corpus"),
              "--vqgan", tokenizers["vqgan"], "--text-tokenizer", tokenizers["text_tokenizer"],
              "--num-frames", "2", "--no-progress", capsys=capsys)  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1])["records"] == TRAIN_VIDEOS

    before = eval_accuracy(start, own / "eval.jsonl", own / "videos", own / "before.json", capsys)

    # 3. fine-tune from the checkpoint with the small config, then export
    out = lvm("train", "--config", str(start / "config.yaml"), "--config", "finetune/own_videos",
              "--init-from", str(start), "--set", f"data.train=[{own / 'corpus'}]", *TOY,
              "--workdir", str(own / "finetune"), "--no-progress", capsys=capsys)  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 40
    lvm("export", "--workdir", str(own / "finetune"), "--out", str(own / "model"), capsys=capsys)

    # 4. held-out questions: better than before (before: about chance; the model never saw these answers)
    after = eval_accuracy(own / "model", own / "eval.jsonl", own / "videos", own / "after.json", capsys)
    assert after > before and after >= 0.9, (before, after)

    # 5. and the chat answers with the new words
    from lvm.chat import Chat
    from lvm.inference import load_model

    chat = Chat(load_model(own / "model"))
    for i in range(2):
        video = chat.read(str(own / "videos" / "eval" / f"{i:03d}.mp4"))
        events = list(chat.ask(video, QUESTION))
        assert events[-1].text == f"{names[i % 2]}.", events[-1]
    print(f"held-out accuracy on {HELD_OUT} questions: before fine-tuning {before:.2f}, after {after:.2f}")
