"""The demo pipeline end to end at toy scale (through the loopback GCS server): every phase runs and
summary.json holds what `make demo` promises. Accuracy targets belong to the full-size `make demo`."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lvm.demo.run import Demo, DemoConfig, StagePlan

pytestmark = [pytest.mark.xdist_group("demo"), pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")]

TOY = DemoConfig(
    stages=(
        StagePlan("s1", 512, "1,8,1,1", 8, 3, 1e4, 16, (6, 10), 4, 5e-3),
        StagePlan("s2", 1024, "1,4,1,2", 4, 2, 4e4, 8, (20, 40), 4, 1e-3),
        StagePlan("s3", 1536, "1,2,1,4", 2, 2, 1.6e5, 4, (80, 84), 4, 1e-3),
    ),
    res=32,
    needle_frames=4,
    vqgan_clips=8,
    vqgan_steps=4,
)


def test_toy_demo_runs_every_phase_through_gcs(tmp_path):
    results = Demo(tmp_path, TOY, gcs=True).run()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(results))
    assert list(summary["stages"]) == ["s1", "s2", "s3"]
    for name, stage in summary["stages"].items():
        assert stage["questions"] == 8 and 0 <= stage["accuracy"] <= 1, name
    frames = [s["frames_per_video"] for s in summary["stages"].values()]
    assert frames == sorted(frames) and frames[0] < frames[-1]  # later stages: longer held-out videos
    final = summary["final"]
    assert final["questions"] == 8 and len(final["by_depth_quarter"]) == 4
    assert 0 <= final["question_only"] <= 1 and 0 <= final["mismatched_video"] <= 1
    assert summary["final_accuracy"] == final["accuracy"]
    for key in ("checkpoint", "vqgan", "text_tokenizer"):
        assert Path(summary[key]).is_absolute() and Path(summary[key]).exists(), key
    assert (Path(summary["checkpoint"]) / "params").is_dir()
    assert Path(summary["heatmap"]).stat().st_size > 0
    assert summary["qa_answer"].endswith(".")
    # the corpora went through gs:// (the training runs read them from the loopback server)
    cfg = (tmp_path / "curriculum" / "stages" / "s1" / "config.yaml").read_text()
    assert "gs://lvm-demo/corpora/s1" in cfg
    # held-out mp4s show the card (dark ground) for exactly `needle_frames` frames
    from decord import VideoReader

    videos = sorted((tmp_path / "videos" / "s3" / "eval").glob("*.mp4"))
    assert len(videos) == 4
    for video in videos:
        reader = VideoReader(str(video))
        frames = reader.get_batch(range(len(reader))).asnumpy()
        dark = ((frames.max(axis=-1) < 50).mean(axis=(1, 2)) > 0.2).sum()
        assert dark == TOY.needle_frames, video


def test_a_needle_longer_than_a_held_out_video_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needle_frames=30 .* shortest held-out video \\(24 frames\\)"):
        Demo(tmp_path, dataclasses.replace(TOY, needle_frames=30))
    assert not any(tmp_path.iterdir())  # nothing written


def test_baselines_ask_each_video_the_previous_videos_questions():
    """An oracle that reads the needle from the video: perfect accuracy, and the mismatched-video baseline is
    exactly the share of consecutive videos whose answers agree (computed here by hand)."""
    from lvm.demo import scenes
    from lvm.demo.evaluate import Evaluator

    colours, shapes = list(scenes.COLOURS), scenes.SHAPES
    items = [{"video": f"v{i}", "colour": colours[i % 4], "shape": shapes[(i // 2) % 4], "depth": i / 8}
             for i in range(8)]  # fmt: skip
    truth = {it["video"]: it for it in items}

    class Oracle:
        def video_context(self, codes, room):
            return codes  # the "codes" are the video name

        def option_logprobs(self, ctx, question, options):
            kind = next(k for k, (q, _) in scenes.QUESTIONS.items() if q == question)
            answer = f"{truth[ctx][kind].capitalize()}."
            return [0.0 if o == answer else -1.0 for o in options]

        def question_only_logprobs(self, question, options):
            return [0.0] + [-1.0] * (len(options) - 1)

    ev = Evaluator(room=8, fps=4)
    ev.codes = {it["video"]: it["video"] for it in items}
    r = ev.run(Oracle(), items, "test", baselines=True)
    assert r["accuracy"] == 1.0 and r["questions"] == 16
    agree = [items[i][k] == items[i - 1][k] for i in range(1, 8) for k in ("colour", "shape")]
    assert r["mismatched_video"] == pytest.approx(sum(agree) / len(agree))
    only = [it["colour"] == colours[0] for it in items] + [it["shape"] == shapes[0] for it in items]
    assert r["question_only"] == pytest.approx(sum(only) / len(only))


def test_needle_card_is_the_same_in_every_video_and_only_at_its_frames():
    """The needle is a card that looks alike wherever it appears (so its VQGAN codes repeat), and every other
    frame is the scene, which differs between videos."""
    from lvm.demo import scenes

    needle = scenes.Needle("blue", "cross", start=3, frames=2)
    a = scenes.scene(8, needle, seed=1).astype(int)
    b = scenes.scene(8, needle, seed=2).astype(int)
    card = np.abs(a[3:5] - b[3:5]).max()
    assert card <= 20  # only pixel noise differs
    assert np.abs(a[:3] - b[:3]).mean() > 5 and np.abs(a[5:] - b[5:]).mean() > 5  # the scenes differ
    blue = np.abs(a[3] - scenes.COLOURS["blue"]).max(-1) <= 10
    assert 0.2 < blue.mean() < 0.7  # a large cross, not the whole frame
    other = scenes.scene(8, scenes.Needle("red", "cross", start=3, frames=2), seed=1).astype(int)
    assert np.abs(other[3] - a[3]).max() > 100  # the colour changes the card
