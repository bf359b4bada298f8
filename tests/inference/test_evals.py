"""`lvm eval-qa` and `lvm eval-needle` end to end on the red/blue model of `qa_assets.trained`, and the pure
pieces (letter parser, per-group aggregation, needle splicing and haystacks) against hand-made answers."""

import json
import shutil

import numpy as np
import pytest

from lvm.cli import main, run_command
from lvm.evals import needle
from lvm.evals.qa import aggregate, letter_prompt, option_text, parse_letter, read_questions, video_uri
from lvm.job_report import EXIT_BAD_INPUTS, JobReport, attempt

pytestmark = [pytest.mark.xdist_group("qa"), pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")]


@pytest.mark.slow
def test_eval_qa_scores_videomme_questions_per_group(trained, tmp_path, question):
    videos = tmp_path / "videos"
    videos.mkdir()
    lines = []
    # The fixture's model tells red from blue reliably on its held-out videos and its training videos (on
    # fresh noise seeds it is right only most of the time), so the questions are about those.
    clips = [("held_out_red", "Red", "short", "colour"), ("held_out_blue", "Blue", "short", "colour"),
             ("v0", "Red", "long", "hue"), ("v1", "Blue", "long", "hue")]  # fmt: skip
    for i, (clip, colour, duration, task) in enumerate(clips):
        shutil.copy(trained / f"{clip}.mp4", videos / f"vid{i}.mp4")
        options = ["A. Red.", "B. Blue."] if i % 2 == 0 else ["A. Blue.", "B. Red."]  # answer letters vary
        answer = "AB"[[option_text(o) for o in options].index(f"{colour}.")]
        lines.append({"videoID": f"vid{i}", "duration": duration, "domain": "synthetic", "task_type": task,
                      "question_id": f"q{i}", "question": question, "options": options, "answer": answer})  # fmt: skip
    lines.append({**lines[0], "question_id": "q0-again"})  # a second question on one video reuses its context
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "report.json"
    argv = ["--checkpoint", str(trained / "export"), "--data", str(data), "--video-dir", str(videos)]
    assert run_command("eval-qa", [*argv, "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["overall"]["count"] == 5 and report["overall"]["chance"] == 0.5
    assert report["overall"]["loglik"] == 1.0, [r["loglik_scores"] for r in report["records"]]
    assert 0 <= report["overall"]["letter"] <= 1
    assert set(report["by_duration"]) == {"short", "long"} and set(report["by_task_type"]) == {
        "colour",
        "hue",
    }
    assert report["by_duration"]["short"]["count"] == 3 and report["by_duration"]["long"]["loglik"] == 1.0
    assert [r["question_id"] for r in report["records"]] == [x["question_id"] for x in lines]
    assert all(r["frames"] >= 1 and isinstance(r["generated"], str) for r in report["records"])


@pytest.mark.slow
def test_eval_needle_writes_grids_and_heatmaps_in_both_modes(trained, tmp_path, question):
    ckpt = ["--checkpoint", str(trained / "export"), "--depths", "0", "1", "--no-progress"]
    assert run_command("eval-needle", [*ckpt, "--out", str(tmp_path), "--mode", "text", "--lengths", "40", "120",
                                       "--max-new-tokens", "4"]) == 0  # fmt: skip
    video_args = ["--mode", "video", "--lengths", "2", "--question", question, "--answer", "Red.",
                  "--options", "Red.", "Blue.", "--needle-video", str(trained / "held_out_red.mp4"),
                  "--haystack-video", str(trained / "held_out_blue.mp4"), "--max-new-tokens", "4"]  # fmt: skip
    assert run_command("eval-needle", [*ckpt, "--out", str(tmp_path), *video_args]) == 0
    for mode, lengths in (("text", [40, 120]), ("video", [2])):  # 2 frames: all the tiny context holds
        grid = json.loads((tmp_path / f"needle_{mode}.json").read_text())
        assert grid["lengths"] == lengths and grid["depths"] == [0, 1]
        assert np.shape(grid["accuracy"]) == (len(lengths), 2) and len(grid["cells"]) == 2 * len(lengths)
        assert all(0 <= a <= 1 for row in grid["accuracy"] for a in row)
        assert (tmp_path / f"needle_{mode}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.shape(grid["option_accuracy"]) == (1, 2)
    assert [c["option_choice"] for c in grid["cells"]] and grid["cells"][0]["expected"] == "Red."


@pytest.mark.slow
def test_evals_skip_missing_and_truncated_videos(trained, tmp_path, question, capsys, monkeypatch):
    """One missing and one truncated video among good ones: eval-qa scores the good videos' questions and
    eval-needle builds its haystack from the good videos; both list the bad ones in the report and exit 3. A
    crash after the first question keeps that question's record in the report."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(trained / "held_out_red.mp4", videos / "red.mp4")
    shutil.copy(trained / "held_out_blue.mp4", videos / "blue.mp4")
    data = (trained / "v0.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    bad = {"missing": str(videos / "missing.mp4"), "truncated": str(videos / "truncated.mp4")}
    lines = [{"videoID": v, "question_id": f"q{i}", "question": question, "options": ["A. Red.", "B. Blue."],
              "answer": "A" if v == "red" else "B"} for i, v in enumerate(["red", "missing", "truncated", "blue"])]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "report.json"
    qa_args = ["eval-qa", "--checkpoint", str(trained / "export"), "--data", str(tmp_path / "qa.jsonl")]
    assert main([*qa_args, "--video-dir", str(videos), "--out", str(out), "--no-progress"]) == EXIT_BAD_INPUTS
    report = json.loads(out.read_text())
    assert report["complete"] and report["questions"] == 4 and report["scored"] == 2
    assert [r["question_id"] for r in report["records"]] == ["q0", "q3"] and report["overall"]["count"] == 2
    assert report["overall"]["loglik"] == 1.0
    assert report["failed"] == 2 and [f["input"] for f in report["failures"]] == list(bad.values())
    assert [f["questions"] for f in report["failures"]] == [["q1"], ["q2"]]
    assert "not found" in report["failures"][0]["error"]
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("lvm eval-qa: ") and "(skipped," in line]
    assert len(ours) == 2 and all(path in line for path, line in zip(bad.values(), ours, strict=True))
    assert "2 of 4 questions scored (2 failures)" in err

    from lvm.evals import qa

    def crash_on_second(*args, score=qa.score_question, calls=[]):  # noqa: B006 (counts the calls)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crashed")
        return score(*args)

    monkeypatch.setattr(qa, "score_question", crash_on_second)
    with pytest.raises(RuntimeError, match="crashed"):
        main([*qa_args, "--video-dir", str(videos), "--out", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    assert not report["complete"] and [r["question_id"] for r in report["records"]] == ["q0"]
    monkeypatch.undo()

    haystack = [str(videos / "red.mp4"), *bad.values(), str(videos / "blue.mp4")]
    video_args = ["--mode", "video", "--lengths", "2", "--depths", "0", "--question", question, "--answer", "Red.",
                  "--needle-video", str(videos / "red.mp4"), "--haystack-video", *haystack]  # fmt: skip
    argv = ["eval-needle", "--checkpoint", str(trained / "export"), "--out", str(tmp_path), "--no-progress"]
    assert main([*argv, *video_args, "--max-new-tokens", "4"]) == EXIT_BAD_INPUTS
    grid = json.loads((tmp_path / "needle_video.json").read_text())
    assert grid["complete"] and len(grid["cells"]) == 1 and (tmp_path / "needle_video.png").exists()
    assert [f["input"] for f in grid["failures"]] == list(bad.values())
    err = capsys.readouterr().err
    assert all(f"lvm eval-needle: cannot read the video {path}" in err for path in bad.values())


def test_job_report_keeps_finished_work(tmp_path, capsys):
    """The report of a job is written as results come in; a bad input is listed and the job goes on; a crash
    keeps what was finished (`complete` false); nothing is written when a job fails before any result."""
    results: list[int] = []
    path, missing = tmp_path / "report.json", str(tmp_path / "a.mp4")
    with pytest.raises(RuntimeError, match="crash"):
        with JobReport("lvm job", path, lambda: {"results": results}) as report:
            results.append(1)
            report.save()
            assert attempt(report, missing, lambda: open(missing)) is None  # recorded, goes on
            results.append(2)
            report.save()  # under every_s since the last write: not written yet
            assert json.loads(path.read_text())["results"] == [1]
            raise RuntimeError("crash")
    written = json.loads(path.read_text())
    assert written["complete"] is False and written["results"] == [1, 2] and written["failed"] == 1
    assert written["failures"] == [{"input": missing, "error": f"No such file or directory: {missing}"}]
    assert report.exit_code == EXIT_BAD_INPUTS
    assert (
        capsys.readouterr().err
        == f"lvm job: No such file or directory: {missing} (skipped, listed in {path})\n"
    )
    with pytest.raises(FileNotFoundError):
        attempt(None, missing, lambda: open(missing))  # without a report: raised
    with pytest.raises(ValueError), JobReport("lvm job", tmp_path / "none.json"):
        raise ValueError("bad --lengths")
    assert not (tmp_path / "none.json").exists()
    with JobReport("lvm job", path, dict) as report:
        pass
    assert json.loads(path.read_text()) == {"complete": True, "failed": 0, "failures": []}
    assert report.exit_code == 0


def test_parse_letter():
    cases = {"B": "B", "(C) green": "C", "B. Blue.": "B", "The answer is D.": "D", "Blue.": None,
             "A": "A", "E": None, "answer: b": None, "I think C": "C"}  # fmt: skip
    for text, letter in cases.items():
        assert parse_letter(text, 4) == letter, text
    assert parse_letter("Red.", 2) is None and parse_letter("C then A", 2) == "A"
    assert (
        option_text("A. Red.") == "Red." and option_text("(B) blue") == "blue" and option_text("Red") == "Red"
    )
    assert letter_prompt("Q?", ["A. x", "B. y"]) == "Q?\nOptions: A. x B. y\nAnswer with the option's letter."
    assert letter_prompt("Q?", ["x", "y"]) == letter_prompt("Q?", ["A. x", "B. y"])


def test_aggregate_per_group():
    def rec(duration, task, n, loglik, letter):
        return {"duration": duration, "task_type": task, "domain": "d", "n_options": n,
                "loglik_correct": loglik, "letter_correct": letter}  # fmt: skip

    records = [rec("short", "ocr", 4, True, False), rec("short", "count", 4, False, False),
               rec("long", "ocr", 2, True, True), rec("long", "ocr", 2, True, False)]  # fmt: skip
    report = aggregate(records)
    assert report["overall"] == {"count": 4, "chance": 0.375, "loglik": 0.75, "letter": 0.25}
    assert report["by_duration"]["short"] == {"count": 2, "chance": 0.25, "loglik": 0.5, "letter": 0.0}
    assert report["by_duration"]["long"] == {"count": 2, "chance": 0.5, "loglik": 1.0, "letter": 0.5}
    assert report["by_task_type"]["ocr"]["count"] == 3 and report["by_task_type"]["ocr"]["letter"] == 1 / 3
    assert report["by_task_type"]["count"]["loglik"] == 0.0 and report["by_domain"]["d"]["count"] == 4


def test_read_questions_and_video_paths(tmp_path):
    good = {"videoID": "v1", "question": "q", "options": ["A. x", "B. y"], "answer": "B"}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "video": "sub/clip.mp4"}) + "\n")
    items = read_questions(path)
    assert video_uri(items[0], "vids") == "vids/v1.mp4" and video_uri(items[1], "vids") == "vids/sub/clip.mp4"
    assert video_uri({**good, "video": "gs://b/c.mp4"}, "vids") == "gs://b/c.mp4"
    for bad, message in (({**good, "answer": "C"}, "not a letter"), ({"question": "q"}, "missing field")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            read_questions(path)


def test_needle_splice_and_text_haystack():
    hay = np.arange(10)[:, None, None] * np.ones((1, 2, 2), int)  # frame i is all i
    needle_codes = np.full((2, 2, 2), 99)
    out = needle.splice(hay, needle_codes, 7, 0.5)
    assert out[:, 0, 0].tolist() == [0, 2, 99, 99, 4, 7, 9]  # 5 evenly resampled frames around the needle
    assert needle.splice(hay, needle_codes, 4, 0.0)[:2, 0, 0].tolist() == [99, 99]
    assert needle.splice(hay, needle_codes, 4, 1.0)[-2:, 0, 0].tolist() == [99, 99]
    assert needle.haystack_frames(hay[:3], 5)[:, 0, 0].tolist() == [0, 1, 2, 0, 1]  # short: repeated

    class Words:  # one token per word
        def encode(self, text, continuation=False):
            return text.split()

    filler = needle.sentences(needle.FILLER)
    for depth in (0.0, 0.5, 1.0):
        text = needle.text_haystack(Words(), filler, 100, depth, "The magic number is 7.")
        words = text.split()
        assert 90 <= len(words) <= 100 and text.count("magic number is 7.") == 1
        at = words.index("magic") / len(words)
        assert abs(at - depth) < 0.1, (depth, at)


def test_scores_by_depth_bin_and_cell():
    from lvm.evals.scores import (
        accuracy,
        accuracy_by_depth_bin,
        accuracy_table,
        depth_bin,
        depth_bin_labels,
        most_likely,
    )

    assert most_likely(["a", "b", "c"], [-2.0, -1.0, -1.0]) == "b"  # the first of equal scores
    assert [depth_bin(d, 4) for d in (0.0, 0.24, 0.25, 0.5, 0.99, 1.0)] == [0, 0, 1, 2, 3, 3]
    assert depth_bin_labels(4) == ["0-25%", "25-50%", "50-75%", "75-100%"]
    records = [{"length": n, "depth": d, "correct": c}
               for n, d, c in [(8, 0.0, True), (8, 0.0, False), (8, 1.0, True), (16, 0.0, False)]]  # fmt: skip
    assert accuracy(records) == 0.5 and np.isnan(accuracy([]))
    assert accuracy_by_depth_bin(records, 2) == [1 / 3, 1.0]
    table = accuracy_table(records, [8, 16], [0.0, 1.0])
    assert table[0] == [0.5, 1.0] and table[1][0] == 0.0 and np.isnan(table[1][1])  # (16, 1.0): no records
