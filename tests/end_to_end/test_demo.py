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
    lights_out=True,
)


@pytest.mark.slow
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
    assert final["order"]["questions"] == 4 and 0 <= final["order"]["accuracy"] <= 1
    assert 0 <= final["order"]["question_only"] <= 1 and 0 <= final["order"]["mismatched_video"] <= 1
    # held-out mp4s show the card for exactly `needle_frames` frames, and the scene goes
    # dark where eval.json says, on the side of the card its order answer says
    from decord import VideoReader

    items = json.loads((tmp_path / "videos" / "s3" / "eval" / "eval.json").read_text())
    assert len(items) == 4 and sorted(it["order"] for it in items) == ["after", "after", "before", "before"]
    for item in items:
        reader = VideoReader(item["video"])
        frames = reader.get_batch(range(len(reader))).asnumpy().astype(int)
        card = (frames.max(-1) - frames.min(-1) > 60).mean(axis=(1, 2)) > 0.2  # a saturated colour
        assert card.sum() == TOY.needle_frames and card[item["start"]], item
        scene = np.flatnonzero(~card)
        brightness = frames[scene].mean(axis=(1, 2, 3))
        dark = scene[brightness < 0.75 * brightness[0]]  # the first frame is always lit
        assert dark.min() == item["lights_out"] and (dark == scene[scene >= item["lights_out"]]).all(), item
        assert (item["start"] >= item["lights_out"]) == (item["order"] == "after"), item


def test_held_out_videos_fill_their_context_and_a_longer_needle_is_refused(tmp_path):
    """Held-out videos are as long as each stage's context holds with `room` tokens left for question and answer
    (counted with the demo's own tokenizer); a needle longer than the shortest is refused before any video is
    written."""
    from lvm.tokenizers import format as fmt
    from lvm.tokenizers.text import SentencePieceTokenizer

    with pytest.raises(ValueError, match="needle_frames=30 .* shortest held-out video \\(24 frames\\)"):
        Demo(tmp_path, dataclasses.replace(TOY, needle_frames=30)).data()
    assert not (tmp_path / "videos").exists()
    demo = Demo(tmp_path, TOY)
    frames = demo.eval_frames()
    assert frames == {"s1": 24, "s2": 54, "s3": 84}
    sp = SentencePieceTokenizer(demo.text_tokenizer())
    for s in TOY.stages:  # one more frame (4 x 4 codes and <eof>) would not leave `room` tokens
        prefix = fmt.build(fmt.video_first_prefix(fmt.Video(np.zeros((frames[s.name], 4, 4), np.int32))), sp)
        assert len(prefix) + TOY.room <= s.seq_len < len(prefix) + TOY.room + 17, s.name


def test_baselines_ask_each_video_the_previous_videos_questions():
    """An oracle that reads the needle from the video: perfect accuracy, and the mismatched-video baseline is
    exactly the share of consecutive videos whose answers agree (computed here by hand)."""
    from lvm.demo import scenes
    from lvm.demo.evaluate import Evaluator

    colours, shapes, orders = list(scenes.COLOURS), scenes.SHAPES, ("before", "after")
    items = [{"video": f"v{i}", "colour": colours[i % 4], "shape": shapes[(i // 2) % 4], "depth": i / 8,
              "order": orders[(i // 3) % 2]} for i in range(8)]  # fmt: skip
    truth = {it["video"]: it for it in items}

    class Oracle:
        def read_videos(self, uris, fps):
            yield from uris  # the "codes" are the video name

        def video_context(self, codes, room):
            return codes

        def option_logprobs(self, ctx, question, options):
            kind = next(k for k, (q, _) in scenes.QUESTIONS.items() if q == question)
            answer = f"{truth[ctx][kind].capitalize()}."
            return [0.0 if o == answer else -1.0 for o in options]

        def question_only_logprobs(self, question, options):
            return [0.0] + [-1.0] * (len(options) - 1)

    ev = Evaluator(room=8, fps=4)
    r = ev.run(Oracle(), items, "test", baselines=True)
    assert r["accuracy"] == 1.0 and r["questions"] == 16
    agree = [items[i][k] == items[i - 1][k] for i in range(1, 8) for k in ("colour", "shape")]
    assert r["mismatched_video"] == pytest.approx(sum(agree) / len(agree))
    only = [it["colour"] == colours[0] for it in items] + [it["shape"] == shapes[0] for it in items]
    assert r["question_only"] == pytest.approx(sum(only) / len(only))
    # the two-option order question is reported on its own, not mixed into the four-option accuracy
    assert r["order"]["accuracy"] == 1.0 and r["order"]["questions"] == 8
    agree = [items[i]["order"] == items[i - 1]["order"] for i in range(1, 8)]
    assert r["order"]["mismatched_video"] == pytest.approx(sum(agree) / len(agree))
    assert r["order"]["question_only"] == pytest.approx(np.mean([it["order"] == "before" for it in items]))
    # videos without the lights-out event: no order question, and nothing NaN for summary.json's strict JSON
    plain = [{k: v for k, v in it.items() if k != "order"} for it in items]
    r = ev.run(Oracle(), plain, "test", baselines=True)
    assert "order" not in r and list(r["by_kind"]) == ["colour", "shape"]
    json.dumps({k: v for k, v in r.items() if k != "records"}, allow_nan=False)


def test_needle_card_is_the_same_in_every_video_and_only_at_its_frames():
    """The needle is a card that is the same image wherever it appears with the lights in the same state (so its
    VQGAN codes repeat), and every other frame is the scene, which differs between videos."""
    from lvm.demo import scenes

    needle = scenes.Needle("blue", "cross", start=3, frames=2)
    a = scenes.scene(8, needle, seed=1).astype(int)
    b = scenes.scene(8, needle, seed=2).astype(int)
    # the same image, without the scenes' pixel noise
    assert (a[3:5] == b[3:5]).all() and (a[3] == a[4]).all()
    assert np.abs(a[:3] - b[:3]).mean() > 5 and np.abs(a[5:] - b[5:]).mean() > 5  # the scenes differ
    blue = np.abs(a[3] - scenes.COLOURS["blue"]).max(-1) <= 10
    assert 0.2 < blue.mean() < 0.7  # a large cross, not the whole frame
    other = scenes.scene(8, scenes.Needle("red", "cross", start=3, frames=2), seed=1).astype(int)
    assert np.abs(other[3] - a[3]).max() > 100  # the colour changes the card
    # in a video whose lights go out: the scene is darker from then on, and a card shown before has a lit ground,
    # one shown after a dark ground (as without the event); the shape glows as brightly either way
    dark = scenes.scene(8, dataclasses.replace(needle, lights_out=1), seed=1).astype(int)
    lit = scenes.scene(8, dataclasses.replace(needle, lights_out=6), seed=1).astype(int)
    assert (dark[0] == a[0]).all() and (lit[:3] == a[:3]).all()
    assert dark[1:3].mean() == pytest.approx(scenes.DARK * a[1:3].mean(), rel=0.05)
    assert lit[6:].mean() == pytest.approx(scenes.DARK * a[6:].mean(), rel=0.05)
    for frames in (dark, lit):
        assert np.abs(frames[3][blue] - scenes.COLOURS["blue"]).max() <= 10
    assert max(dark[3][~blue].mean(), a[3][~blue].mean()) < 40 < 90 < lit[3][~blue].mean()


@pytest.mark.parametrize("frames, n", [(40, 8), (114, 24), (490, 100)])
def test_lights_go_out_near_the_needle_on_the_side_asked_and_the_order_is_balanced(frames, n):
    """The lights-out frame sits 1 to frames/8 frames before the card (`after`) or after it, never inside it,
    with a lit first frame and a dark last frame; over a held-out set the answers are balanced and the
    needle's depth alone does not give the order away."""
    from lvm.demo import scenes

    needles = scenes.with_balanced_lights_out(scenes.needles(n, frames, 8, seed=3), frames, seed=4)
    orders = [scenes.answer(needle, "order") for needle in needles]
    assert orders.count("after") == orders.count("before") == n // 2
    for needle in needles:
        out, start, end = needle.lights_out, needle.start, needle.end
        gap = start - out if out <= start else out - end
        assert 1 <= out <= frames - 1 and 1 <= gap <= max(1, frames // 8), needle
    starts, after = np.array([needle.start for needle in needles]), np.array(orders) == "after"
    by_depth = max(max(np.mean((starts >= t) == after), np.mean((starts < t) == after)) for t in starts)
    assert by_depth <= 0.5 + 2 / n  # the best depth threshold does no better than chance
    # no room on the side asked: the other side; no room on either: no lights-out and no order question
    assert (
        scenes.answer(scenes.with_lights_out(scenes.Needle("red", "bar", 0, 4), 40, True, 0), "order")
        == "before"
    )
    lit = scenes.with_lights_out(scenes.Needle("red", "bar", 0, 4), 4, True, 0)
    assert lit.lights_out is None
    with pytest.raises(ValueError, match="order question needs"):
        scenes.answer(lit, "order")


def test_seed_frame_size_and_per_stage_warmup_reach_the_tokenizer_and_curriculum_configs(tmp_path):
    from lvm.curriculum import load_curriculum

    stages = tuple(dataclasses.replace(s, warmup=w) for s, w in zip(TOY.stages, (7, 5, 0), strict=True))
    demo = Demo(tmp_path, dataclasses.replace(TOY, seed=3, res=16, stages=stages))
    vq = demo.vqgan_config()
    assert vq.train.seed == 3 and vq.model.resolution == 16
    loaded = load_curriculum(demo.curriculum_file({"s1": "a", "s2": "b", "s3": "c", "text": "t"})).stages
    assert [s.cfg.train.warmup_steps for s in loaded] == [7, 5, 0]
    assert all(s.cfg.train.seed == 3 and s.cfg.data.seed == 3 for s in loaded)
